//! Chat data → prompt format → tokens → memory-mapped shards → batches.
//!
//! - [`chat`]: chat files (SimpleLLaMA's schema, `messages`, `conversations`; JSON or JSONL).
//! - [`format`]: SimpleLLaMA's prompt format, in pieces that know what they supervise.
//! - [`tokenizer`]: a checked `tokenizer.json`, and training one.
//! - [`example`]: one tokenized conversation with its supervision.

pub mod batch;
pub mod chat;
pub mod example;
pub mod format;
pub mod tokenizer;

pub use batch::Batch;
pub use chat::{read_chat_file, Conversation, Turn, DEFAULT_SYSTEM_PROMPT};
pub use example::{tokenize_conversation, Example};
pub use format::{inference_prompt, TrainOn};
pub use tokenizer::{train_tokenizer, ChatTokenizer};
