"""Planning: latency-vs-tokens curves (:mod:`.curve`), the cost model and the schedule search
(:mod:`.auto_schedule`). These build and time models through export and the runtimes, so they sit
above :mod:`vitfold.profiles`, which stays torch-free: measurement and report writing only."""
