//! SimpleLLaMA's prompt format, as a sequence of pieces that know what they supervise.
//!
//! Training text: `<SOT>{system}<EOT>\n\n` then the turns `<SOU>{u}<EOU>\n<SOA>{a}<EOA>` joined by
//! `\n\n`. Formatting in pieces (rather than one string) lets tokenization know exactly which
//! tokens belong to a supervised reply: special tokens split the text in the tokenizer, so the
//! tokens of the whole string are the concatenation of the tokens of its pieces.

use std::borrow::Cow;

use super::chat::{Conversation, Turn, DEFAULT_SYSTEM_PROMPT};

pub const SOS: &str = "<SOS>";
pub const EOS: &str = "<EOS>";
pub const PAD: &str = "<PAD>";
pub const UNK: &str = "<UNK>";
pub const SOU: &str = "<SOU>";
pub const EOU: &str = "<EOU>";
pub const SOA: &str = "<SOA>";
pub const EOA: &str = "<EOA>";
pub const SOT: &str = "<SOT>";
pub const EOT: &str = "<EOT>";

/// SimpleLLaMA's ten special tokens, in its id order (0–9).
pub const SIMPLELLAMA_SPECIALS: [&str; 10] = [SOS, EOS, PAD, UNK, SOU, EOU, SOA, EOA, SOT, EOT];
/// The tokens the chat format needs (plus `<PAD>`, the ignored target).
pub const CHAT_TOKENS: [&str; 6] = [SOU, EOU, SOA, EOA, SOT, EOT];

/// The character inserted into a special-token string found in user text, so that it stays text.
pub const ESCAPE_CHAR: char = '\u{200B}';

/// Which assistant replies are supervised.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum, Default,
)]
pub enum TrainOn {
    /// The final reply and its `<EOA>` (SimpleLLaMA).
    #[default]
    FinalReply,
    /// Every assistant reply and its `<EOA>`.
    AllAssistant,
}

/// One piece of formatted text: a special token, or plain text (escaped before tokenization).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Special(&'static str),
    Text(&'a str),
}

/// A piece and whether its tokens are training targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormattedPiece<'a> {
    pub piece: Piece<'a>,
    pub supervised: bool,
}

fn push_turn<'a>(out: &mut Vec<FormattedPiece<'a>>, turn: &'a Turn, supervised: bool) {
    let ctx = |piece| FormattedPiece { piece, supervised: false };
    out.push(ctx(Piece::Special(SOU)));
    out.push(ctx(Piece::Text(&turn.user)));
    out.push(ctx(Piece::Special(EOU)));
    out.push(ctx(Piece::Text("\n")));
    out.push(ctx(Piece::Special(SOA)));
    out.push(FormattedPiece { piece: Piece::Text(&turn.assistant), supervised });
    out.push(FormattedPiece { piece: Piece::Special(EOA), supervised });
}

/// The training pieces of a conversation.
pub fn training_pieces(conv: &Conversation, train_on: TrainOn) -> Vec<FormattedPiece<'_>> {
    let mut out = Vec::with_capacity(4 + conv.turns.len() * 8);
    let ctx = |piece| FormattedPiece { piece, supervised: false };
    out.push(ctx(Piece::Special(SOT)));
    out.push(ctx(Piece::Text(&conv.system)));
    out.push(ctx(Piece::Special(EOT)));
    out.push(ctx(Piece::Text("\n\n")));
    let last = conv.turns.len().saturating_sub(1);
    for (i, turn) in conv.turns.iter().enumerate() {
        if i > 0 {
            out.push(ctx(Piece::Text("\n\n")));
        }
        let supervised = train_on == TrainOn::AllAssistant || i == last;
        push_turn(&mut out, turn, supervised);
    }
    out
}

/// Escapes every occurrence of the given special-token strings in `text` by inserting
/// [`ESCAPE_CHAR`] after their first character (`<EOA>` → `<\u{200B}EOA>`).
pub fn escape_specials<'a, S: AsRef<str>>(text: &'a str, specials: &[S]) -> Cow<'a, str> {
    if !specials.iter().any(|s| !s.as_ref().is_empty() && text.contains(s.as_ref())) {
        return Cow::Borrowed(text);
    }
    let mut s = text.to_string();
    // Escaping one token cannot create another (the escape char is in no special string), but
    // overlapping tokens may need a second round.
    for _ in 0..4 {
        let mut changed = false;
        for special in specials {
            let special = special.as_ref();
            if special.is_empty() || !s.contains(special) {
                continue;
            }
            let split = special.chars().next().map_or(0, char::len_utf8);
            let escaped = format!("{}{ESCAPE_CHAR}{}", &special[..split], &special[split..]);
            s = s.replace(special, &escaped);
            changed = true;
        }
        if !changed {
            break;
        }
    }
    Cow::Owned(s)
}

/// Joins pieces into text (texts escaped against `specials`).
pub fn join_pieces<S: AsRef<str>>(pieces: &[FormattedPiece<'_>], specials: &[S]) -> String {
    let mut s = String::new();
    for p in pieces {
        match p.piece {
            Piece::Special(t) => s.push_str(t),
            Piece::Text(t) => s.push_str(&escape_specials(t, specials)),
        }
    }
    s
}

/// The full training text of a conversation (SimpleLLaMA's `x`), texts escaped.
pub fn training_text(conv: &Conversation) -> String {
    join_pieces(&training_pieces(conv, TrainOn::FinalReply), &SIMPLELLAMA_SPECIALS)
}

/// The prompt for generating the next reply: the history formatted as in training, then
/// `<SOU>{user}<EOU>\n<SOA>`. Uses the training separators so that the prompt is a prefix of
/// a training text (SimpleLLaMA's inference code uses other newlines). Special-token strings in
/// the texts are escaped; generation uses [`ChatTokenizer::inference_prompt`], which also escapes
/// the tokenizer's own special tokens, as training does.
///
/// [`ChatTokenizer::inference_prompt`]: super::ChatTokenizer::inference_prompt
pub fn inference_prompt(system: &str, history: &[Turn], user: &str) -> String {
    inference_prompt_escaping(system, history, user, &SIMPLELLAMA_SPECIALS)
}

/// [`inference_prompt`] escaping `specials` in the texts.
pub fn inference_prompt_escaping<S: AsRef<str>>(
    system: &str,
    history: &[Turn],
    user: &str,
    specials: &[S],
) -> String {
    let esc = |t| escape_specials(t, specials);
    let mut s = format!("{SOT}{}{EOT}\n\n", esc(system));
    for turn in history {
        s.push_str(&format!("{SOU}{}{EOU}\n{SOA}{}{EOA}\n\n", esc(&turn.user), esc(&turn.assistant)));
    }
    s.push_str(&format!("{SOU}{}{EOU}\n{SOA}", esc(user)));
    s
}

/// A Jinja chat template (Hugging Face's dialect) that renders exactly what this module
/// produces: [`training_text`] for a conversation that ends with the assistant, and
/// [`inference_prompt_escaping`] with `add_generation_prompt`. Without a system message the
/// default system prompt applies, as for a `CUSTOM` record; `specials` are escaped in every
/// text as [`escape_specials`] escapes them. Assistant replies (and their `<EOA>`) are inside
/// `{% generation %}` markers, so transformers' `return_assistant_tokens_mask` sees them.
pub fn simplellama_jinja<S: AsRef<str>>(specials: &[S]) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut esc = String::new();
    let mut sorted: Vec<&str> = specials.iter().map(AsRef::as_ref).filter(|s| !s.is_empty()).collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for special in sorted {
        let split = special.chars().next().map_or(0, char::len_utf8);
        let escaped = format!("{}{ESCAPE_CHAR}{}", &special[..split], &special[split..]);
        esc.push_str(&format!(" | replace({}, {})", quote(special), quote(&escaped)));
    }
    let default = quote(DEFAULT_SYSTEM_PROMPT);
    format!(
        "{{%- if messages and messages[0]['role'] == 'system' %}}{{% set system = messages[0]['content'] %}}\
{{% set loop_messages = messages[1:] %}}{{% else %}}{{% set system = {default} %}}{{% set loop_messages = messages %}}\
{{% endif %}}{{{{ '{SOT}' + (system{esc}) + '{EOT}\\n\\n' }}}}{{% for message in loop_messages %}}\
{{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}}{{{{ raise_exception('SimpleLLaMA format: after an \
optional system message, user and assistant messages alternate, starting with the user') }}}}{{% endif %}}\
{{% if message['role'] == 'user' %}}{{% if not loop.first %}}{{{{ '\\n\\n' }}}}{{% endif %}}\
{{{{ '{SOU}' + (message['content']{esc}) + '{EOU}\\n' }}}}{{% else %}}{{{{ '{SOA}' }}}}{{% generation %}}\
{{{{ (message['content']{esc}) + '{EOA}' }}}}{{% endgeneration %}}{{% endif %}}{{% endfor %}}\
{{% if add_generation_prompt %}}{{{{ '{SOA}' }}}}{{% endif %}}"
    )
}
