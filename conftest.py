# Root scripts are thin CLI wrappers kept for the seed's users, not tests (even if named test_*).
collect_ignore = ["check_gpu_readiness.py", "test_layer_by_layer_gpu.py"]
