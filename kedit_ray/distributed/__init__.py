"""Ray-side code: the eval driver and its worker actors (driver.py, worker.py), the Parquet sink
(sink.py, which needs no Ray) and the stats workers. Import the modules themselves."""
