//! One tokenized conversation and which of its tokens are training targets.

use anyhow::{anyhow, Result};

use super::chat::Conversation;
use super::format::{training_pieces, Piece, TrainOn};
use super::tokenizer::ChatTokenizer;

/// A tokenized conversation. `supervised[i]` says that `tokens[i]` is a target: the model is
/// trained to predict it from `tokens[..i]`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub supervised: Vec<bool>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn n_supervised(&self) -> usize {
        self.supervised.iter().filter(|&&s| s).count()
    }

    /// Supervised token ranges `[start, end)`, in order.
    pub fn spans(&self) -> Vec<[u32; 2]> {
        let mut spans = Vec::new();
        let mut start = None;
        for (i, &s) in self.supervised.iter().chain([&false]).enumerate() {
            match (s, start) {
                (true, None) => start = Some(i),
                (false, Some(b)) => {
                    spans.push([b as u32, i as u32]);
                    start = None;
                }
                _ => {}
            }
        }
        spans
    }

    /// Builds an example from tokens and supervised spans.
    pub fn from_spans(tokens: Vec<u32>, spans: &[[u32; 2]]) -> Self {
        let mut supervised = vec![false; tokens.len()];
        for &[a, b] in spans {
            let (a, b) = ((a as usize).min(tokens.len()), (b as usize).min(tokens.len()));
            supervised[a..b].iter_mut().for_each(|s| *s = true);
        }
        Example { tokens, supervised }
    }
}

/// Formats and tokenizes a conversation piece by piece. Because special tokens split the
/// tokenizer's input, the tokens equal those of the whole formatted text, and each token's
/// supervision is that of the piece it came from. A tokenizer that adds a BOS token to texts
/// (`ChatTokenizer::bos_id`) gets it first, unsupervised.
///
/// A tokenizer loaded with a chat template formats with it instead
/// ([`super::template::tokenize_with_template`]).
pub fn tokenize_conversation(tok: &ChatTokenizer, conv: &Conversation, train_on: TrainOn) -> Result<Example> {
    if let Some(tpl) = tok.template() {
        return super::template::tokenize_with_template(tok, tpl, conv, train_on);
    }
    let pieces = training_pieces(conv, train_on);
    let mut ex = Example::default();
    if let Some(bos) = tok.bos_id() {
        ex.tokens.push(bos);
        ex.supervised.push(false);
    }
    for p in &pieces {
        match p.piece {
            Piece::Special(s) => {
                let id = tok.special_id(s).ok_or_else(|| anyhow!("tokenizer lacks special token {s}"))?;
                ex.tokens.push(id);
                ex.supervised.push(p.supervised);
            }
            Piece::Text(t) => {
                let ids = tok.encode_text(t)?;
                ex.supervised.resize(ex.supervised.len() + ids.len(), p.supervised);
                ex.tokens.extend_from_slice(&ids);
            }
        }
    }
    Ok(ex)
}
