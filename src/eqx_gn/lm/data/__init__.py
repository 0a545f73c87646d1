"""The data of a run: the corpus (`_corpus`), tokenizers (`_tokenizers`), the
token cache on disk (`_token_cache`) and the grain pipeline of token windows and
global batches (`_pipeline`)."""
