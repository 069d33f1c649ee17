"""Benchmarks behind `onestep bench --suite ...`: compare (teacher vs students) and step-overhead, convergence,
attention, scaling, memory, modes. Each module is one suite; real-size runs here are benchmarks, never CI tests."""
