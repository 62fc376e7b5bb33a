"""Running jobs: queues and enqueue, the stage bodies, the worker, study completion, the lease reaper."""
