"""The torch-free contract between the API and the workers: the job spec (spec.py and its parts),
the sparsity patterns, the method table, the engine's report, the memory estimate and the Hub's
reachability. Pure Python (pydantic, httpx, huggingface_hub): the API process imports these and
nothing else of ``worker``; the engine and the worker import them too."""
