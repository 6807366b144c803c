"""Data for experiments: tasks, tokenization with loss masks, fixed-shape batches.

Examples:
  >>> from lora_jax import data
  >>> enc = data.Encoder(encode=lambda s: list(s.encode()), end_id=0)
  >>> task = data.get_task("python-docs-lm")
  >>> windows = task.tokenize_split("val", enc, max_len=128)
  >>> batch = data.batch_at(data.pad_examples(windows, 128), 0, batch_size=4, seed=0)
  >>> {k: (v.shape, v.dtype.name) for k, v in batch.items()}
  {'tokens': ((4, 128), 'int32'), 'loss_mask': ((4, 128), 'float32'), 'attention_mask': ((4, 128), 'int32')}
"""

from lora_jax.data.batching import batch_at, eval_batches, pad_examples, position
from lora_jax.data.code_summaries import CodeSummary
from lora_jax.data.encoding import Encoder, Tokenized, as_encoder, encode_chat, encode_turn, pack_windows, plain_chat
from lora_jax.data.files import Conversation, DataError, read_jsonl, read_text
from lora_jax.data.scoring import score_summaries
from lora_jax.data.tasks import TASKS, ChatFiles, CodeSummarization, Document, PythonDocsLM, TextFiles, get_task

__all__ = [
    "TASKS",
    "ChatFiles",
    "CodeSummarization",
    "CodeSummary",
    "Conversation",
    "DataError",
    "Document",
    "Encoder",
    "PythonDocsLM",
    "TextFiles",
    "Tokenized",
    "as_encoder",
    "batch_at",
    "encode_chat",
    "encode_turn",
    "eval_batches",
    "get_task",
    "pack_windows",
    "pad_examples",
    "plain_chat",
    "position",
    "read_jsonl",
    "read_text",
    "score_summaries",
]
