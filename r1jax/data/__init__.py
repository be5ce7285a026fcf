"""Tokenizer, templates, tasks and input pipelines.

tokenizer.py      `load` (sentencepiece .model or HF directory), the R1-Zero and R1
                  chat templates (`TEMPLATES`), the toy sentencepiece tokenizer (`train`)
hf_tokenizer.py   Hugging Face tokenizer.json directories (the `tokenizers` library)
chat_template.py  Jinja chat templates, rendered as transformers renders them
chat.py           chat JSONL for SFT, the loss on assistant tokens only
tasks/            `TASKS` (arithmetic, countdown) with held-out splits; JSONL readers
pipelines.py      grain: SFT token batches and RL prompt batches with resumable state
"""
