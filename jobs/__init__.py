"""What the API and the workers share: settings, the job store and its states, the data
directory, the queue's configuration. Imports the library's config only; never the API
(``service``) or the worker (``worker``), which both import this."""
