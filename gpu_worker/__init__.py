"""The GPU worker: scores one time range of a video with a PyTorch model and writes an encoded segment.

No Azure import anywhere here: a compute task runs `python -m gpu_worker …` on a source it can read.
"""
