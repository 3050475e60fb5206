"""The Celery worker: carries job ids, runs ``clcalib.pipeline.run_calibration``."""
