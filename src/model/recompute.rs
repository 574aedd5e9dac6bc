//! Activation recompute: which forward activations a training step keeps for the backward, and
//! which it recomputes there, trading a part of a forward pass for memory.
//!
//! - `none`: every layer keeps all it needs (the fastest; the most memory).
//! - `mlp`: a layer keeps its FFN block's input (`ffn_norm(h)`) but not the gate/up projection
//!   and the SwiGLU output (`3 · ffn_hidden` per token, the largest share): the backward
//!   recomputes them, one layer at a time, into one shared scratch set.
//! - `layer`: only the residual stream entering each layer is kept; the backward recomputes the
//!   whole layer's forward (its norm, projections, RoPE, attention, dropout masks and all) into
//!   one scratch set of a layer's activations just before that layer's backward.
//!
//! The recompute runs the same ops on the same inputs with the same dropout seeds, so it writes
//! the same values as the forward did (bit for bit on the CPU backend): the gradients do not
//! depend on the mode, only the memory and the time do.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// What a training step recomputes in the backward instead of keeping from the forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// Nothing: every activation the backward reads is kept.
    #[default]
    None,
    /// The FFN's gate/up projection and SwiGLU of each layer.
    Mlp,
    /// Each layer's whole forward, from the residual stream entering it.
    Layer,
}

impl Recompute {
    /// From the least recompute (fastest) to the most (least memory).
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Mlp, Recompute::Layer];

    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Mlp => "mlp",
            Recompute::Layer => "layer",
        }
    }

    /// Whether each layer keeps its own attention-block activations (qkv, attention output,
    /// `h`, `ffn_norm(h)`): false only for `layer`.
    pub fn keeps_attention(self) -> bool {
        self != Recompute::Layer
    }

    /// Whether each layer keeps its gate/up projection and SwiGLU output.
    pub fn keeps_mlp(self) -> bool {
        self == Recompute::None
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Recompute {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Recompute> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Recompute::None),
            "mlp" => Ok(Recompute::Mlp),
            "layer" => Ok(Recompute::Layer),
            other => bail!("unknown recompute mode {other:?}: expected none, mlp or layer"),
        }
    }
}

/// A recompute mode, or `auto`: the least recompute with which the step fits the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecomputeChoice {
    Fixed(Recompute),
    Auto,
}

impl Default for RecomputeChoice {
    fn default() -> Self {
        RecomputeChoice::Fixed(Recompute::None)
    }
}

impl std::fmt::Display for RecomputeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecomputeChoice::Fixed(r) => r.fmt(f),
            RecomputeChoice::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for RecomputeChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<RecomputeChoice> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(RecomputeChoice::Auto);
        }
        s.parse::<Recompute>()
            .map(RecomputeChoice::Fixed)
            .map_err(|_| anyhow::anyhow!("unknown recompute mode {s:?}: expected none, mlp, layer or auto"))
    }
}

/// As its name (`"mlp"`, `"auto"`), as in a train config file.
impl Serialize for RecomputeChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RecomputeChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(format!("recompute: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_print_and_serialize_by_name() {
        for r in Recompute::ALL {
            assert_eq!(r.name().parse::<Recompute>().unwrap(), r);
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{}\"", r.name()));
            assert_eq!(format!("{}", RecomputeChoice::Fixed(r)).parse::<RecomputeChoice>().unwrap(), {
                RecomputeChoice::Fixed(r)
            });
        }
        assert_eq!("AUTO".parse::<RecomputeChoice>().unwrap(), RecomputeChoice::Auto);
        let err = "attention".parse::<RecomputeChoice>().unwrap_err().to_string();
        assert!(err.contains("none, mlp, layer or auto"), "{err}");
        assert!("auto".parse::<Recompute>().is_err());
    }
}
