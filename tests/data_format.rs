//! Prompt format strings, the chat schemas and their errors, escaping, and tokenization
//! compatibility with SimpleLLaMA's tokenizer.

mod common;

use std::io::Write;

use common::data::{conv, simplellama_tokenizer, small_tokenizer, synthetic_conversations};
use sft::data::format::{training_text, SIMPLELLAMA_SPECIALS};
use sft::data::{
    inference_prompt, read_chat_file, tokenize_conversation, ChatTokenizer, TrainOn, Turn,
    DEFAULT_SYSTEM_PROMPT,
};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
    p
}

#[test]
fn single_turn_format() {
    let c = conv("Be brief.", &[("Hi", "Hello!")]);
    assert_eq!(training_text(&c), "<SOT>Be brief.<EOT>\n\n<SOU>Hi<EOU>\n<SOA>Hello!<EOA>");
}

#[test]
fn multi_turn_format() {
    let c = conv("S", &[("u1", "a1"), ("u2", "a2"), ("u3", "a3")]);
    assert_eq!(
        training_text(&c),
        "<SOT>S<EOT>\n\n<SOU>u1<EOU>\n<SOA>a1<EOA>\n\n<SOU>u2<EOU>\n<SOA>a2<EOA>\n\n<SOU>u3<EOU>\n<SOA>a3<EOA>"
    );
}

#[test]
fn custom_template_and_custom_system_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "chat.json",
        r#"[{"Template": ["CUSTOM"], "User": ["What is 2+2?"], "Assistant": ["4"]},
            {"Template": ["You are a pirate."], "User": ["a", "b"], "Assistant": ["c", ""]}]"#,
    );
    let convs = read_chat_file(&p).unwrap();
    assert_eq!(convs[0].system, DEFAULT_SYSTEM_PROMPT);
    assert!(DEFAULT_SYSTEM_PROMPT.starts_with("You are Simple LLaMA, a helpful"));
    assert_eq!(
        training_text(&convs[0]),
        format!("<SOT>{DEFAULT_SYSTEM_PROMPT}<EOT>\n\n<SOU>What is 2+2?<EOU>\n<SOA>4<EOA>")
    );
    assert_eq!(
        training_text(&convs[1]),
        "<SOT>You are a pirate.<EOT>\n\n<SOU>a<EOU>\n<SOA>c<EOA>\n\n<SOU>b<EOU>\n<SOA><EOA>"
    );
}

#[test]
fn inference_prompt_is_a_prefix_of_the_training_text() {
    let c = conv("S", &[("u1", "a1"), ("u2", "a2")]);
    let p = inference_prompt("S", &c.turns[..1], "u2");
    assert_eq!(p, "<SOT>S<EOT>\n\n<SOU>u1<EOU>\n<SOA>a1<EOA>\n\n<SOU>u2<EOU>\n<SOA>");
    assert!(training_text(&c).starts_with(&p));
}

#[test]
fn three_schemas_and_jsonl_give_the_same_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let a =
        write(&dir, "a.json", r#"[{"Template": ["sys"], "User": ["u1", "u2"], "Assistant": ["a1", "a2"]}]"#);
    let b = write(
        &dir,
        "b.jsonl",
        r#"{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}
{"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "u2"}, {"from": "gpt", "value": "a2"}]}
"#,
    );
    let a = read_chat_file(&a).unwrap();
    let b = read_chat_file(&b).unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(b.len(), 2);
    assert_eq!(a[0], b[0]);
    assert_eq!(a[0], b[1]);
    assert_eq!(a[0].turns[1], Turn { user: "u2".into(), assistant: "a2".into() });
    // No system message: the default prompt.
    let c = write(
        &dir,
        "c.json",
        r#"[{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]"#,
    );
    assert_eq!(read_chat_file(&c).unwrap()[0].system, DEFAULT_SYSTEM_PROMPT);
}

#[test]
fn bad_inputs_name_file_example_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let ok = r#"{"Template": ["CUSTOM"], "User": ["u"], "Assistant": ["a"]}"#;
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"Template": ["CUSTOM"], "User": "u", "Assistant": ["a"]}"#,
            &["field `User`", "expected a list of strings, found a string"],
        ),
        (
            r#"{"Template": ["CUSTOM"], "User": [1], "Assistant": ["a"]}"#,
            &["field `User[0]`", "found a number"],
        ),
        (r#"{"Template": ["CUSTOM"], "User": [], "Assistant": []}"#, &["field `User`", "empty list"]),
        (r#"{"Template": [], "User": ["u"], "Assistant": ["a"]}"#, &["field `Template`", "empty list"]),
        (
            r#"{"Template": ["CUSTOM"], "User": ["u", "v"], "Assistant": ["a"]}"#,
            &["length mismatch", "2 user turns, 1 assistant"],
        ),
        (r#"{"Template": ["CUSTOM"], "User": ["u"]}"#, &["missing field `Assistant`"]),
        (
            r#"{"messages": [{"role": "assistant", "content": "a"}]}"#,
            &["field `messages[0]`", "roles out of order"],
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}"#,
            &["field `messages[1]`", "two user messages"],
        ),
        (r#"{"messages": [{"role": "user", "content": "a"}]}"#, &["does not end with an assistant"]),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "s"}]}"#,
            &["field `messages[2]`", "system message may only come first"],
        ),
        (r#"{"messages": []}"#, &["field `messages`", "empty list"]),
        (r#"{"messages": [{"role": "robot", "content": "a"}]}"#, &["messages[0].role", "unknown role"]),
        (
            r#"{"conversations": [{"from": "human", "value": null}]}"#,
            &["conversations[0].value", "expected a string, found null"],
        ),
        (r#"{"foo": 1}"#, &["unknown schema"]),
        (r#"[1]"#, &["expected an object"]),
    ];
    for (i, (bad, needles)) in cases.iter().enumerate() {
        let p = write(&dir, &format!("bad{i}.json"), &format!("[{ok}, {bad}]"));
        let err = format!("{:#}", read_chat_file(&p).unwrap_err());
        assert!(err.contains(&format!("bad{i}.json")), "{err}");
        assert!(err.contains("example 1"), "{err}");
        for n in *needles {
            assert!(err.contains(n), "case {i}: {err:?} lacks {n:?}");
        }
    }
    for (name, text, needle) in [
        ("empty.json", "", "empty chat file"),
        ("emptylist.json", "[]", "no conversations"),
        ("broken.json", "[{\"Template\": [", "invalid JSON"),
        (
            "brokenl.jsonl",
            "{\"Template\": \"s\", \"User\": [\"u\"], \"Assistant\": [\"a\"]}\n{oops",
            "example 1",
        ),
    ] {
        let p = write(&dir, name, text);
        let err = format!("{:#}", read_chat_file(&p).unwrap_err());
        assert!(err.contains(name) && err.contains(needle), "{err}");
    }
}

#[test]
fn special_token_strings_in_text_stay_text() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let c = conv("sys <SOT>", &[("say <EOA> please", "ok <EOA><PAD>")]);
    let ex = tokenize_conversation(&tok, &c, TrainOn::FinalReply).unwrap();
    let count = |id: u32| ex.tokens.iter().filter(|&&t| t == id).count();
    assert_eq!(count(tok.eoa_id()), 1);
    assert_eq!(count(tok.pad_id()), 0);
    assert_eq!(count(tok.special_id("<SOT>").unwrap()), 1);
    // The formatted text escapes them, and encoding it gives the same tokens.
    let text = training_text(&c);
    assert!(text.contains("say <\u{200B}EOA> please"));
    assert_eq!(tok.encode(&text).unwrap(), ex.tokens);
    // Inference prompts escape too.
    assert!(inference_prompt("s", &[], "<SOA>").contains("<SOU><\u{200B}SOA><EOU>"));
}

#[test]
fn trained_tokenizer_has_simplellama_specials_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    for (i, s) in SIMPLELLAMA_SPECIALS.iter().enumerate() {
        assert_eq!(tok.special_id(s), Some(i as u32));
    }
    assert_eq!(tok.vocab_size(), 400);
    let reloaded = ChatTokenizer::from_file(&dir.path().join("tok.json")).unwrap();
    let ids = reloaded.encode("hello how are you").unwrap();
    assert_eq!(reloaded.decode(&ids).unwrap(), " hello how are you");
}

#[test]
fn missing_chat_tokens_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let _ = small_tokenizer(dir.path());
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tok.json")).unwrap()).unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    added.retain(|t| t["content"] != "<EOA>" && t["content"] != "<PAD>");
    let p = dir.path().join("bad_tok.json");
    std::fs::write(&p, json.to_string()).unwrap();
    let err = format!("{:#}", ChatTokenizer::from_file(&p).unwrap_err());
    assert!(err.contains("bad_tok.json") && err.contains("<EOA>") && err.contains("<PAD>"), "{err}");
    assert!(!err.contains("<SOA>"), "{err}");
}

/// SimpleLLaMA: x = the training text, y = final reply + "<EOA>"; encode(y) is a suffix of
/// encode(x). Our supervision (from token positions) must equal that suffix, and our per-piece
/// tokens must equal encoding the whole string.
#[test]
fn simplellama_tokenizer_ids_and_suffix_property() {
    let Some(path) = simplellama_tokenizer() else { return };
    let tok = ChatTokenizer::from_file(&path).unwrap();
    assert_eq!(tok.vocab_size(), 8192);
    for (i, s) in SIMPLELLAMA_SPECIALS.iter().enumerate() {
        assert_eq!(tok.special_id(s), Some(i as u32), "{s}");
    }
    assert_eq!((tok.pad_id(), tok.eoa_id()), (2, 7));
    // No post-processor: rows start at <SOT>, as SimpleLLaMA's do.
    assert_eq!(tok.bos_id(), None);
    let mut convs = synthetic_conversations(300, 11);
    convs.push(conv("", &[("", "")]));
    convs.push(conv("S", &[("What is 2+2?", "")]));
    convs.push(conv(" lead space", &[("  two", " x\n"), ("\n\nq", "\tans  ")]));
    convs.push(conv("unicode ✓", &[("héllo wörld 日本", "emoji 🙂 ok")]));
    for c in &convs {
        let x = training_text(c);
        let y = format!("{}<EOA>", c.turns.last().unwrap().assistant);
        let x_ids = tok.encode(&x).unwrap();
        let y_ids = tok.encode(&y).unwrap();
        let ex = tokenize_conversation(&tok, c, TrainOn::FinalReply).unwrap();
        assert_eq!(ex.tokens, x_ids, "{x:?}");
        assert!(x_ids.ends_with(&y_ids), "{x:?}");
        let expected: Vec<bool> = (0..x_ids.len()).map(|i| i >= x_ids.len() - y_ids.len()).collect();
        assert_eq!(ex.supervised, expected, "{x:?}");
    }
}

/// SimpleLLaMA's worked example: `<SOA>` predicts the first reply token, the last reply token
/// predicts `<EOA>`.
#[test]
fn worked_example_what_is_2_plus_2() {
    let Some(path) = simplellama_tokenizer() else { return };
    let tok = ChatTokenizer::from_file(&path).unwrap();
    let c = conv("CUSTOM", &[("What is 2+2?", "2+2 equals 4.")]);
    let ex = tokenize_conversation(&tok, &c, TrainOn::FinalReply).unwrap();
    let soa = ex.tokens.iter().position(|&t| t == 6).unwrap();
    let reply = tok.encode(" 2+2 equals 4.").unwrap();
    assert_eq!(&ex.tokens[soa + 1..soa + 1 + reply.len()], &reply[..]);
    assert!(!ex.supervised[soa], "<SOA> itself is context");
    assert!(ex.supervised[soa + 1..].iter().all(|&s| s), "reply and <EOA> are targets");
    assert!(ex.supervised[..=soa].iter().all(|&s| !s));
    assert_eq!(*ex.tokens.last().unwrap(), 7);
    assert_eq!(tok.decode(&ex.tokens[soa + 1..]).unwrap(), " 2+2 equals 4.");
}

#[test]
fn all_assistant_supervises_every_reply_and_its_eoa() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let c = conv("s", &[("u1", "a1"), ("u2", "a2")]);
    let all = tokenize_conversation(&tok, &c, TrainOn::AllAssistant).unwrap();
    let fin = tokenize_conversation(&tok, &c, TrainOn::FinalReply).unwrap();
    assert_eq!(all.tokens, fin.tokens);
    assert_eq!(all.spans().len(), 2);
    assert_eq!(fin.spans().len(), 1);
    for [_, end] in all.spans() {
        assert_eq!(all.tokens[end as usize - 1], tok.eoa_id());
    }
    assert_eq!(all.spans()[1], fin.spans()[0]);
}

/// Random text over characters that stress the pre-tokenizer: letters of several scripts,
/// combining marks, digits of several kinds, punctuation, apostrophes, many kinds of whitespace.
fn random_text(rng: &mut sft::rng::Rng, max_len: usize) -> String {
    const PIECES: &[&str] = &[
        "a", "Z", "é", "ß", "日", "本", "я", "ω", "\u{301}", "\u{94d}", "0", "7", "٣", "½", "Ⅻ", "²", " ",
        " ", "  ", "\n", "\t", "\r\n", "\u{a0}", "\u{2003}", "\u{200b}", "'", "'s", "'t", "'re", "'ve", "'m",
        "'ll", "'d", "'S", ".", ",", "!", "?", "-", "_", "(", ")", "{", "}", "<", ">", "<EOA>", "<SOU", "🙂",
        "👍🏽", "$", "€", "#", "hello", " world", "don't", "it's", "x1", "3.14", "\u{feff}", "\u{0}", "\u{7f}",
        "\u{85}", "\u{2028}",
    ];
    let n = rng.below(max_len + 1);
    (0..n).map(|_| PIECES[rng.below(PIECES.len())]).collect()
}

#[test]
fn cached_text_encoding_equals_the_tokenizers_crate_on_random_text() {
    let dir = tempfile::tempdir().unwrap();
    let mut toks = vec![small_tokenizer(dir.path())];
    if let Some(p) = simplellama_tokenizer() {
        toks.push(ChatTokenizer::from_file(&p).unwrap());
    }
    let mut rng = sft::rng::Rng::new(42);
    for tok in &toks {
        for _ in 0..20_000 {
            let text = random_text(&mut rng, 24);
            assert_eq!(tok.encode_text(&text).unwrap(), tok.encode_text_uncached(&text).unwrap(), "{text:?}");
        }
    }
}

/// The other encoding paths: a pre-tokenizer that is not a bare ByteLevel (cached words through
/// the `tokenizers` pre-tokenizer) and a tokenizer with a normalizer (the plain pipeline) give the
/// tokens of the whole formatted text too.
#[test]
fn other_tokenizer_shapes_keep_the_piece_property() {
    let dir = tempfile::tempdir().unwrap();
    let _ = small_tokenizer(dir.path());
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tok.json")).unwrap()).unwrap();
    let mut seq = base.clone();
    seq["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [base["pre_tokenizer"]]});
    let mut nfc = base.clone();
    nfc["normalizer"] = serde_json::json!({"type": "NFC"});
    let mut rng = sft::rng::Rng::new(3);
    for (name, json) in [("seq.json", seq), ("nfc.json", nfc)] {
        let p = dir.path().join(name);
        std::fs::write(&p, json.to_string()).unwrap();
        let tok = ChatTokenizer::from_file(&p).unwrap();
        for _ in 0..300 {
            let c =
                conv(&random_text(&mut rng, 6), &[(&random_text(&mut rng, 10), &random_text(&mut rng, 10))]);
            let ex = tokenize_conversation(&tok, &c, TrainOn::FinalReply).unwrap();
            assert_eq!(ex.tokens, tok.encode(&training_text(&c)).unwrap(), "{name}: {c:?}");
            let t = random_text(&mut rng, 20);
            assert_eq!(tok.encode_text(&t).unwrap(), tok.encode_text_uncached(&t).unwrap(), "{name}: {t:?}");
        }
    }
}
