"""One training run: its settings (`_config`, GN's in `_gn_config`, their checks in
`_checks`), the methods (`_methods`) and the optimizers of its phases
(`_phase_optimizers`, `_recipes`), its jitted steps (`_steps`), the training loop
(`_train`), what it prints (`_console`), its output directory (`_run_dir`),
checkpoints and their integrity record (`_checkpoint`, `_integrity`), and its
processes and devices (`_parallel`)."""
