//! Chat data → prompt format → tokens → memory-mapped shards → batches.
//!
//! - [`chat`]: chat files (JSON, JSON Lines or Parquet).
//! - [`sources`]: the record schemas (SimpleLLaMA's, `messages`, ShareGPT `conversations`, Alpaca,
//!   `prompt`/`completion`), one function each, mapped to [`Conversation`].
//! - [`format`](mod@format): SimpleLLaMA's prompt format, in pieces that know what they supervise.
//! - [`template`]: a model's own Jinja chat template, rendered as transformers does, and its loss mask.
//! - [`tokenizer`]: a checked `tokenizer.json`, and training one.
//! - [`example`]: one tokenized conversation with its supervision.
//! - [`shard`]: the memory-mapped token shard format.
//! - [`prepare`](mod@prepare): chat file → train/val shards (rayon-parallel).
//! - [`loader`]: datasets of shards and the padded or packed batches the trainer sees.
//! - [`cli`]: the `prepare`, `inspect` and `tokenizer` subcommands.

pub mod batch;
pub mod chat;
pub mod cli;
pub mod example;
pub mod format;
pub mod loader;
pub mod prepare;
pub mod shard;
pub mod sources;
pub mod template;
pub mod tokenizer;

pub use batch::Batch;
pub use chat::{read_chat_file, Conversation, Turn, DEFAULT_SYSTEM_PROMPT};
pub use example::{tokenize_conversation, Example};
pub use format::{inference_prompt, TrainOn};
pub use loader::{
    batches_from_examples, batches_in_order, longest_example, BatchMode, Dataset, ExampleRef, Loader,
    LoaderConfig, LoaderState, NoSupervisedTokens, Split,
};
pub use prepare::{prepare, PrepareOptions, PrepareReport};
pub use template::{ChatFormat, ChatTemplate};
pub use tokenizer::{train_tokenizer, ChatTokenizer, FormatChoice};
