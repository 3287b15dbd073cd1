"""The contract between sa2va-tui's two spines: the engine (`experiments`, which runs
inside worker processes) and the tool around it (`sa2va_tui`: CLI, supervisor, run
store, reports, the Textual app).

Both import this package; it imports neither, and nothing heavy (no torch,
stable-baselines3, transformers, gymnasium or textual), so that the UI process stays
light and a worker never loads the UI. What crosses between the two lives here:

    config       the typed config schema and its loading (one-line errors)
    events       the events a worker reports and the control messages it obeys
    kinds        the registry of experiment kinds (entry point, batch size, rows)
    layout       every file and folder name of a run folder
    evaluation   the evaluation table's schema
    gpus         what NVML tells about the GPUs, as typed values, and GPU choice
    recovery     the failure classification and restart policy (pure functions)
    worker       what the supervisor hands a worker process, and its spawn entry
    files        atomic writes and reading a log's tail
"""
