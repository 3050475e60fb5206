import sys

from worker.main import run_worker

run_worker(sys.argv[1:])
