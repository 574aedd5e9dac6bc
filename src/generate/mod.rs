//! Sampling with a KV cache: `sft generate` and `sft chat`.
//!
//! The prompt is the training format up to the reply's `<SOA>`
//! ([`ChatTokenizer::encode_prompt`]), so the model continues exactly where a supervised reply
//! starts in training; generation stops at `<EOA>`. Sampling follows SimpleLLaMA: temperature,
//! then top-k, then top-p (nucleus) over what top-k kept. Temperature 0 is greedy decoding.

use crate::backend::Backend;
use crate::data::{ChatTokenizer, Turn};
use crate::model::Model;
use crate::rng::Rng;
use anyhow::{ensure, Result};

pub mod cli;

/// How replies are sampled (SimpleLLaMA's defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Logits are divided by this; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Then keep the smallest set of those whose probability sums to at least top_p (1 = all).
    pub top_p: f32,
    pub max_new_tokens: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { temperature: 0.3, top_k: 10, top_p: 0.5, max_new_tokens: 512 }
    }
}

impl SamplingConfig {
    /// Greedy decoding (what the demo scores).
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingConfig { temperature: 0.0, top_k: 0, top_p: 1.0, max_new_tokens }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a finite number >= 0, got {}",
            self.temperature
        );
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "top_p must be in (0, 1], got {}", self.top_p);
        ensure!(self.max_new_tokens > 0, "max_new_tokens must be at least 1");
        Ok(())
    }
}

/// Picks the next token from `logits` (the whole vocabulary) as `cfg` says.
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, rng: &mut Rng) -> u32 {
    if cfg.temperature == 0.0 {
        return argmax(logits);
    }
    // Candidates by decreasing logit (ties broken by id, so the order is deterministic).
    let mut order: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
    if order.is_empty() {
        return argmax(logits);
    }
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if cfg.top_k > 0 {
        order.truncate(cfg.top_k);
    }
    let top = logits[order[0] as usize];
    let mut probs: Vec<f64> =
        order.iter().map(|&i| (((logits[i as usize] - top) / cfg.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    // Nucleus: the smallest prefix whose mass reaches top_p (the first token always stays).
    let mut kept = probs.len();
    let mut mass = 0.0;
    for (i, p) in probs.iter().enumerate() {
        mass += p;
        if mass >= cfg.top_p as f64 {
            kept = i + 1;
            break;
        }
    }
    let kept_mass: f64 = probs[..kept].iter().sum();
    let mut u = rng.next_f64() * kept_mass;
    for (i, p) in probs[..kept].iter().enumerate() {
        if u < *p {
            return order[i];
        }
        u -= p;
    }
    order[kept - 1]
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The stop token (`<EOA>`) was sampled.
    Stop,
    /// max_new_tokens were generated.
    Length,
    /// The context (the model's max_seq_len) is full.
    Context,
}

/// Generates after `prompt`, stopping at `stop` (not included in the result), max_new_tokens,
/// or a full context. The prompt keeps its last `max_seq_len - 1` tokens when longer.
pub fn generate_ids<B: Backend>(
    model: &mut Model<B>,
    prompt: &[u32],
    stop: u32,
    cfg: &SamplingConfig,
    rng: &mut Rng,
) -> Result<(Vec<u32>, StopReason)> {
    cfg.validate()?;
    ensure!(!prompt.is_empty(), "the prompt has no tokens");
    let max_len = model.config().max_seq_len;
    ensure!(
        max_len >= 2,
        "the model's context (max_seq_len {max_len}) leaves no room for a prompt and a reply"
    );
    let dropped = prompt.len().saturating_sub(max_len - 1);
    if dropped > 0 {
        // The reply then answers a different conversation than the one given: say so.
        eprintln!(
            "note: the prompt has {} tokens, more than the model's context of {max_len} leaves room for: \
             its first {dropped} tokens were dropped",
            prompt.len()
        );
    }
    let prompt = &prompt[dropped..];
    let mut cache = model.new_cache(max_len)?;
    let mut logits = model.next_logits(&mut cache, prompt)?;
    let mut out = Vec::new();
    loop {
        let next = sample_token(&logits, cfg, rng);
        if next == stop {
            return Ok((out, StopReason::Stop));
        }
        out.push(next);
        if out.len() >= cfg.max_new_tokens {
            return Ok((out, StopReason::Length));
        }
        if cache.len() >= max_len {
            return Ok((out, StopReason::Context));
        }
        logits = model.next_logits(&mut cache, &[next])?;
    }
}

/// One assistant reply to `user` after `history`, with `system` as the system prompt.
pub fn generate_reply<B: Backend>(
    model: &mut Model<B>,
    tok: &ChatTokenizer,
    system: &str,
    history: &[Turn],
    user: &str,
    cfg: &SamplingConfig,
    rng: &mut Rng,
) -> Result<String> {
    let prompt = tok.encode_prompt(system, history, user)?;
    let (ids, why) = generate_ids(model, &prompt, tok.eoa_id(), cfg, rng)?;
    if why == StopReason::Context {
        // The reply did not end: it ran into the end of the model's context.
        eprintln!(
            "note: the reply was cut after {} tokens: the model's context of {} tokens is full",
            ids.len(),
            model.config().max_seq_len
        );
    }
    // A reply's first token carries the space that the byte-level pre-tokenizer puts before
    // every text piece: it is not part of the reply.
    let text = tok.decode(&ids)?;
    Ok(text.strip_prefix(' ').map(str::to_string).unwrap_or(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut rng = Rng::new(1);
        let cfg = SamplingConfig::greedy(4);
        assert_eq!(sample_token(&[0.1, 2.0, -1.0, 1.9], &cfg, &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut rng = Rng::new(2);
        let cfg = SamplingConfig { temperature: 5.0, top_k: 1, top_p: 1.0, max_new_tokens: 1 };
        for _ in 0..100 {
            assert_eq!(sample_token(&[0.0, 0.5, 0.4, -3.0], &cfg, &mut rng), 1);
        }
    }

    #[test]
    fn top_k_and_top_p_limit_the_candidates() {
        let logits = [3.0, 2.9, 2.8, 0.0, -1.0, 2.7];
        let mut rng = Rng::new(3);
        let k2 = SamplingConfig { temperature: 1.0, top_k: 2, top_p: 1.0, max_new_tokens: 1 };
        let mut seen = [0usize; 6];
        for _ in 0..2000 {
            seen[sample_token(&logits, &k2, &mut rng) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3] + seen[4] + seen[5], 0, "{seen:?}");

        // Probabilities ~ (0.29, 0.26, 0.24, 0.21) over ids 0, 1, 2, 5: top_p 0.5 keeps two.
        let p = SamplingConfig { temperature: 1.0, top_k: 4, top_p: 0.5, max_new_tokens: 1 };
        let mut seen = [0usize; 6];
        for _ in 0..2000 {
            seen[sample_token(&logits, &p, &mut rng) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3] + seen[4] + seen[5], 0, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // Two tokens with logits differing by ln 3 at temperature 1: frequencies 3:1.
        let logits = [3f32.ln(), 0.0];
        let cfg = SamplingConfig { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 1 };
        let mut rng = Rng::new(4);
        let n = 20000;
        let zeros = (0..n).filter(|_| sample_token(&logits, &cfg, &mut rng) == 0).count();
        let share = zeros as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "share of token 0: {share}");
    }

    #[test]
    fn bad_settings_are_rejected() {
        let bad = SamplingConfig { temperature: -1.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("temperature"));
        let bad = SamplingConfig { top_p: 0.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
    }
}
