// Every kernel file the emulation compiles and the entries it exports, as `(file stem of
// kernels/NAME.cu, entries)`. build.rs includes this file to generate the C++ entry points
// (`emu_ENTRY`); the emulation's report checks it against the entries of the PTX, so an entry
// added to a kernel file and not here fails the run. flash_attention.cu runs in its own
// program (tests/flash_emu), whose report lines are merged in.
pub const EMULATED: &[(&str, &[&str])] = &[
    ("cast", &["cast_f32_to_bf16", "cast_bf16_to_f32"]),
    (
        "rmsnorm",
        &["rmsnorm_forward", "residual_rmsnorm_forward", "rmsnorm_backward", "rmsnorm_backward_dw_reduce"],
    ),
    ("rope", &["rope_table", "rope_apply"]),
    ("swiglu", &["swiglu_forward", "swiglu_backward"]),
    ("dropout", &["dropout_bf16", "dropout_f32"]),
    ("embedding", &["embedding_forward", "embedding_backward_grouped", "embedding_backward_grouped_bf16"]),
    ("cross_entropy", &["cross_entropy_gather_rows", "cross_entropy_scatter_rows", "cross_entropy_rows"]),
    ("global_norm", &["sum_squares_f32", "sum_squares_bf16", "sum_split"]),
    ("adamw", &["adamw_multi", "adamw_multi_bf16"]),
    ("matmul", &["matmul_fallback_f32out", "matmul_fallback_bf16out"]),
    (
        "attention",
        &[
            "attention_forward_32",
            "attention_forward_64",
            "attention_forward_128",
            "attention_decode_32",
            "attention_decode_64",
            "attention_decode_128",
            "attention_kv_cache_write",
            "attention_backward_d",
            "attention_backward_dq_32",
            "attention_backward_dq_64",
            "attention_backward_dq_128",
            "attention_backward_dkdv_32",
            "attention_backward_dkdv_64",
            "attention_backward_dkdv_128",
        ],
    ),
];

/// Kernel files run by another program (scripts/emulate.sh runs it and passes its report).
pub const SEPARATE: &[&str] = &["flash_attention"];
