"""``eqx-gn study`` (its command in `_command`): the protocol (`_protocol`), a
study's runs (`_running`, each reused from its run directory or trained), their
records (`_records`), ``study.json``'s content (`_result`), plots (`_figures`) and
the results page (`_page`, `_model_section`).

The protocol is documented in `_command`'s docstring and on the Results page.
"""
