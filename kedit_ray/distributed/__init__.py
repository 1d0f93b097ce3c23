"""Ray only: one cluster connection (cluster.py), one model-holding worker base (worker.py), one pool with one
fault policy (pool.py), and the jobs over it: eval's single protocol (driver.py), its batch and sequential
protocols (batch.py), layer statistics (stats.py), causal tracing (trace.py), training (train.py, on Ray Train).
Import the modules themselves."""
