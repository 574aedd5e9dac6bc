//! The demo's chat data: a deterministic generator of small tasks with exactly one right
//! answer, so that a tiny model's replies can be scored by exact match.
//!
//! - `sum`: single-digit addition ("What is 7 + 5?" → "12");
//! - `reverse`: three to five letters in reverse order ("Reverse: c a f" → "f a c");
//! - `upper`: the same letters in capitals ("Shout: c a f" → "C A F");
//! - `lookup`: a fixed table of animal colours ("What color is the fox?" → "orange").
//!
//! A quarter of the conversations have an earlier turn (another task) before the scored one,
//! so that the multi-turn format and its final-reply-only loss are exercised too.

use crate::data::{Conversation, Turn};
use crate::rng::Rng;

/// The system prompt of every demo conversation (short: the model is tiny and so is its context).
pub const SYSTEM: &str = "Answer exactly.";

pub const TASKS: [&str; 4] = ["sum", "reverse", "upper", "lookup"];

const LETTERS: [char; 8] = ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'];

const COLORS: [(&str, &str); 10] = [
    ("fox", "orange"),
    ("frog", "green"),
    ("crow", "black"),
    ("swan", "white"),
    ("bear", "brown"),
    ("pig", "pink"),
    ("canary", "yellow"),
    ("whale", "blue"),
    ("mouse", "grey"),
    ("flamingo", "pink"),
];

/// One generated task instance: the question, its one right answer, and which task it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub kind: &'static str,
    pub question: String,
    pub answer: String,
}

fn letters(rng: &mut Rng) -> Vec<char> {
    let n = 3 + rng.below(3);
    (0..n).map(|_| LETTERS[rng.below(LETTERS.len())]).collect()
}

fn spaced(chars: impl IntoIterator<Item = char>) -> String {
    chars.into_iter().map(String::from).collect::<Vec<_>>().join(" ")
}

/// One task instance of the given kind.
pub fn task(kind: &'static str, rng: &mut Rng) -> Task {
    let (question, answer) = match kind {
        "sum" => {
            let (a, b) = (rng.below(10), rng.below(10));
            (format!("What is {a} + {b}?"), (a + b).to_string())
        }
        "reverse" => {
            let l = letters(rng);
            (format!("Reverse: {}", spaced(l.iter().copied())), spaced(l.iter().rev().copied()))
        }
        "upper" => {
            let l = letters(rng);
            (
                format!("Shout: {}", spaced(l.iter().copied())),
                spaced(l.iter().map(|c| c.to_ascii_uppercase())),
            )
        }
        "lookup" => {
            let (animal, color) = COLORS[rng.below(COLORS.len())];
            (format!("What color is the {animal}?"), color.to_string())
        }
        other => unreachable!("unknown demo task {other}"),
    };
    Task { kind, question, answer }
}

/// A scored conversation: its earlier turns and the task whose reply is supervised and scored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoExample {
    pub history: Vec<Turn>,
    pub task: Task,
}

impl DemoExample {
    pub fn conversation(&self) -> Conversation {
        let mut turns = self.history.clone();
        turns.push(Turn { user: self.task.question.clone(), assistant: self.task.answer.clone() });
        Conversation { system: SYSTEM.to_string(), turns }
    }
}

/// `n` examples from `seed`, the tasks in turn (so each has a quarter of them).
pub fn generate(n: usize, seed: u64) -> Vec<DemoExample> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let mut history = Vec::new();
            if rng.below(4) == 0 {
                let earlier = task(TASKS[rng.below(TASKS.len())], &mut rng);
                history.push(Turn { user: earlier.question, assistant: earlier.answer });
            }
            DemoExample { history, task: task(TASKS[i % TASKS.len()], &mut rng) }
        })
        .collect()
}

/// The examples as a chat file in SimpleLLaMA's schema (a JSON list).
pub fn to_simplellama_json(examples: &[DemoExample]) -> String {
    let records: Vec<serde_json::Value> = examples
        .iter()
        .map(|ex| {
            let conv = ex.conversation();
            serde_json::json!({
                "Template": [conv.system],
                "User": conv.turns.iter().map(|t| t.user.clone()).collect::<Vec<_>>(),
                "Assistant": conv.turns.iter().map(|t| t.assistant.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut s = String::from("[\n");
    for (i, r) in records.iter().enumerate() {
        s.push_str(&r.to_string());
        s.push_str(if i + 1 < records.len() { ",\n" } else { "\n" });
    }
    s.push_str("]\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_right() {
        let mut rng = Rng::new(5);
        for _ in 0..50 {
            let t = task("sum", &mut rng);
            let nums: Vec<usize> =
                t.question.trim_end_matches('?').split(' ').filter_map(|w| w.parse().ok()).collect();
            assert_eq!(t.answer, (nums[0] + nums[1]).to_string());
            let t = task("reverse", &mut rng);
            let mut fwd: Vec<&str> = t.question.trim_start_matches("Reverse: ").split(' ').collect();
            fwd.reverse();
            assert_eq!(t.answer, fwd.join(" "));
            let t = task("upper", &mut rng);
            assert_eq!(t.answer, t.question.trim_start_matches("Shout: ").to_uppercase());
        }
    }

    #[test]
    fn generation_is_deterministic_and_balanced() {
        let a = generate(400, 7);
        assert_eq!(a, generate(400, 7));
        assert_ne!(a, generate(400, 8));
        for kind in TASKS {
            assert_eq!(a.iter().filter(|e| e.task.kind == kind).count(), 100);
        }
        let multi = a.iter().filter(|e| !e.history.is_empty()).count();
        assert!((60..140).contains(&multi), "{multi} two-turn conversations");
    }

    #[test]
    fn the_chat_file_parses_back() {
        let ex = generate(20, 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.json");
        std::fs::write(&path, to_simplellama_json(&ex)).unwrap();
        let convs = crate::data::read_chat_file(&path).unwrap();
        let expected: Vec<Conversation> = ex.iter().map(DemoExample::conversation).collect();
        assert_eq!(convs, expected);
    }
}
