"""Worker programs of the multi-process tests, and the launcher and process group they share.

Each worker is a real module (linted like the rest), run as ``python -m distributed_workers.<name>`` by
:func:`distributed_workers.launch.run_workers`; each joins a gloo process group through a file in the
test's temporary folder (no TCP port) and leaves it cleanly (:func:`distributed_workers.group.process_group`).
"""
