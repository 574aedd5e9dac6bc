//! Checkpoints on disk: safetensors files, Hugging Face Llama names/config/import, and the
//! atomic save/prune/load of a training run. Sits beside the model; imports nothing above it.
//!
//! ```text
//! out_dir/
//!   latest                 "step-1200": the checkpoint to resume from (replaced atomically)
//!   step-1200/
//!     model.safetensors      weights, Hugging Face Llama names and layouts, f32
//!     config.json            LlamaForCausalLM fields, plus "sft": our exact ModelConfig
//!     tokenizer.json         a copy of the tokenizer the model was trained with
//!     optimizer.safetensors  AdamW moments "m.<name>", "v.<name>" (internal names; f32, or bf16
//!                            with --optimizer-state bf16)
//!     trainer_state.json     the trainer's own state (step, data position, ...), as it wrote it
//! ```
//!
//! - [`safetensors`]: f32 tensors to and from `.safetensors` files.
//! - [`hf`]: Hugging Face Llama tensor names and shapes, the conversion to and from the internal
//!   layout, and reading a (possibly sharded) Hugging Face weights directory.
//! - [`hf_config`]: `config.json` both ways.
//! - [`run`]: atomic saves, pruning, `latest`, and loading a checkpoint into a model.
//! - [`import`]: `sft import`.
//! - [`export`]: `sft export`, the directory users ship (bf16, tokenizer config with the chat
//!   template, generation config).

pub mod export;
mod fsync;
pub mod hf;
pub mod hf_config;
pub mod import;
pub mod peft;
pub mod run;
pub mod safetensors;

pub use self::hf::{from_hf, hf_shapes, read_hf_weights, read_params, to_hf};
pub use self::hf_config::{config_of_json, hf_config_json, is_checkpoint_config, read_model_config};
pub use self::run::{
    latest, list_checkpoints, load_generation_model, load_inference_model, load_optimizer_into,
    load_run_state, load_tokenizer, load_tokenizer_for, load_training_model, load_weights_into, save,
    save_over, save_weights, save_weights_with, save_with, step_dir_name, Checkpoint, TokenizerSource,
};
pub use self::safetensors::{
    read_safetensors, tensor_dtypes, tensor_shapes, write_safetensors, write_safetensors_bf16,
};

pub const MODEL_FILE: &str = "model.safetensors";
/// The index of a sharded Hugging Face checkpoint: `{"weight_map": {tensor: shard file}}`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const LATEST_FILE: &str = "latest";
