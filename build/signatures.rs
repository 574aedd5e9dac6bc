//! Reads the `extern "C" __global__` signatures of kernels/*.cu and writes the typed launchers.
//!
//! Used by build.rs, and compiled into the library's tests (src/kernels.rs) so that the parser's
//! handling of macros, typedefs and unreadable signatures is tested like any other code.
//!
//! The parser understands what the kernels use: comments, `typedef A B;`, `struct S { ... };`
//! parameter structs, `__launch_bounds__(...)`, and function-like `#define` macros whose body
//! declares kernels (expanded where invoked at the top level, `##` pasting included). Anything
//! else in a kernel signature panics with the file and the text it could not read: a kernel is
//! never skipped silently.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

/// One kernel parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    /// The Rust element type (pointers) or value type (scalars).
    pub rust: String,
    pub kind: ParamKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// `const T*`: read by the kernel.
    In,
    /// `T*`: written (or read and written) by the kernel.
    Out,
    /// Passed by value.
    Scalar,
}

/// A `struct` declared in a kernel file, mirrored as `#[repr(C)]` in Rust (pointer fields as
/// `u64` device addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Struct {
    pub name: String,
    /// (field name, Rust type, C declaration)
    pub fields: Vec<(String, String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The file stem of kernels/NAME.cu (the PTX module).
    pub module: String,
    pub name: String,
    pub params: Vec<Param>,
    /// The C signature, for the launcher's documentation.
    pub c_signature: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signatures {
    pub kernels: Vec<Kernel>,
    pub structs: Vec<Struct>,
}

/// Parses every file; panics (failing the build) on a signature it cannot read.
pub fn kernel_signatures(sources: &[PathBuf]) -> Signatures {
    let mut all = Signatures::default();
    for src in sources {
        let module = src.file_stem().unwrap().to_string_lossy().to_string();
        let text = fs::read_to_string(src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
        let parsed = parse_source(&module, &text).unwrap_or_else(|e| panic!("kernels/{module}.cu: {e}"));
        all.kernels.extend(parsed.kernels);
        all.structs.extend(parsed.structs);
    }
    for k in &mut all.kernels {
        k.module = module_of(&k.module, &k.name);
    }
    let mut seen = BTreeMap::new();
    for k in &all.kernels {
        if let Some(other) = seen.insert(k.name.clone(), k.module.clone()) {
            panic!("kernel {} is declared in both kernels/{other}.cu and kernels/{}.cu", k.name, k.module);
        }
    }
    all
}

/// Kernels whose names end in this suffix use Hopper-only instructions (wgmma): build.rs compiles
/// their file a second time for compute_90a with `-DSFT_SM90A`, into the module `STEM_sm90a`,
/// which the backend loads on compute capability 9.0 only.
pub const SM90A_SUFFIX: &str = "_sm90";

/// The PTX module of kernel `name` of kernels/`stem`.cu.
pub fn module_of(stem: &str, name: &str) -> String {
    if name.ends_with(SM90A_SUFFIX) {
        format!("{stem}{SM90A_SUFFIX}a")
    } else {
        stem.to_string()
    }
}

/// The kernels and parameter structs of one `.cu` file.
pub fn parse_source(module: &str, text: &str) -> Result<Signatures, String> {
    let text = strip_comments(text);
    let (body, macros) = take_defines(&text);
    let expanded = expand_macros(&body, &macros)?;
    let mut typedefs: BTreeMap<String, String> = BTreeMap::new();
    for cap in find_all(&expanded, "typedef ") {
        let end = expanded[cap..].find(';').ok_or("unterminated typedef")? + cap;
        let words: Vec<&str> = expanded[cap + "typedef ".len()..end].split_whitespace().collect();
        if let Some((alias, target)) = words.split_last() {
            typedefs.insert(alias.to_string(), target.join(" "));
        }
    }
    let mut struct_bodies: BTreeMap<String, String> = BTreeMap::new();
    for start in find_all(&expanded, "struct ") {
        let rest = &expanded[start + "struct ".len()..];
        let Some(open) = rest.find('{') else { continue };
        let name = rest[..open].trim();
        if !is_ident(name) || rest[..open].contains(';') {
            continue;
        }
        let close = rest.find('}').ok_or_else(|| format!("struct {name}: no closing brace"))?;
        struct_bodies.insert(name.to_string(), rest[open + 1..close].to_string());
    }
    let known: Vec<String> = struct_bodies.keys().cloned().collect();
    let mut out = Signatures::default();
    let mut search = 0;
    while let Some(pos) = expanded[search..].find("extern \"C\"") {
        let at = search + pos;
        search = at + 1;
        let rest = expanded[at + "extern \"C\"".len()..].trim_start();
        if !rest.starts_with("__global__") {
            continue;
        }
        let kernel = parse_kernel(module, &rest["__global__".len()..], &typedefs, &known)
            .map_err(|e| format!("cannot read the kernel signature `{}`: {e}", snippet(rest)))?;
        out.kernels.push(kernel);
    }
    let globals = find_all(&expanded, "__global__").len();
    if globals != out.kernels.len() {
        return Err(format!(
            "{globals} `__global__` declarations but {} `extern \"C\" __global__` kernels; every kernel \
             must be declared `extern \"C\" __global__ void name(...)` (after macro expansion)",
            out.kernels.len()
        ));
    }
    // Mirror the structs that kernels take pointers to.
    for name in &known {
        if !out.kernels.iter().any(|k| k.params.iter().any(|p| &p.rust == name)) {
            continue;
        }
        let mut fields = Vec::new();
        for decl in struct_bodies[name].split(';').map(str::trim).filter(|d| !d.is_empty()) {
            let (field, ty) = parse_decl(decl, &typedefs, &[])
                .map_err(|e| format!("struct {name}, field `{decl}`: {e}"))?;
            let rust = match ty.kind {
                ParamKind::Scalar => ty.rust,
                _ => "u64".to_string(),
            };
            fields.push((field, rust, decl.split_whitespace().collect::<Vec<_>>().join(" ")));
        }
        out.structs.push(Struct { name: name.clone(), fields });
    }
    Ok(out)
}

fn snippet(s: &str) -> String {
    let end = s.find('{').unwrap_or(s.len()).min(300);
    s[..end].split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_kernel(
    module: &str,
    rest: &str,
    typedefs: &BTreeMap<String, String>,
    structs: &[String],
) -> Result<Kernel, String> {
    let mut rest = rest.trim_start();
    rest = rest.strip_prefix("void").ok_or("a kernel must return void")?.trim_start();
    if let Some(after) = rest.strip_prefix("__launch_bounds__") {
        let close = matching_paren(after).ok_or("unbalanced __launch_bounds__(...)")?;
        rest = after[close + 1..].trim_start();
    }
    let open = rest.find('(').ok_or("no parameter list")?;
    let name = rest[..open].trim();
    if !is_ident(name) {
        return Err(format!("`{name}` is not a kernel name"));
    }
    let close = matching_paren(&rest[open..]).ok_or("unbalanced parameter list")? + open;
    let list = &rest[open + 1..close];
    let mut params = Vec::new();
    for decl in list.split(',').map(str::trim) {
        if decl.is_empty() || decl == "void" {
            if list.trim().is_empty() || list.trim() == "void" {
                break;
            }
            return Err("empty parameter".to_string());
        }
        let (pname, ty) =
            parse_decl(decl, typedefs, structs).map_err(|e| format!("parameter `{decl}`: {e}"))?;
        params.push(Param { name: pname, rust: ty.rust, kind: ty.kind });
    }
    let c_signature = format!("{name}({})", list.split_whitespace().collect::<Vec<_>>().join(" "));
    Ok(Kernel { module: module.to_string(), name: name.to_string(), params, c_signature })
}

struct Ty {
    rust: String,
    kind: ParamKind,
}

/// `const float* __restrict__ x` → ("x", In f32).
fn parse_decl(
    decl: &str,
    typedefs: &BTreeMap<String, String>,
    structs: &[String],
) -> Result<(String, Ty), String> {
    if decl.contains(['[', '(', '&', '<']) {
        return Err("arrays, references, templates and function pointers are not supported".to_string());
    }
    let spaced = decl.replace('*', " * ");
    let mut words: Vec<&str> = spaced.split_whitespace().collect();
    let name = words.pop().ok_or("empty declaration")?;
    if !is_ident(name) {
        return Err(format!("`{name}` is not a parameter name"));
    }
    let stars = words.iter().filter(|w| **w == "*").count();
    if stars > 1 {
        return Err("pointers to pointers are not supported".to_string());
    }
    if words.iter().skip_while(|w| **w != "*").any(|w| *w == "const") {
        return Err("a const pointer (`T* const`) is not supported; drop the const".to_string());
    }
    let is_const = words.iter().take_while(|w| **w != "*").any(|w| *w == "const");
    let base: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !matches!(*w, "*" | "const" | "__restrict__" | "__restrict" | "restrict" | "struct"))
        .collect();
    let mut c_type = base.join(" ");
    for _ in 0..8 {
        match typedefs.get(&c_type) {
            Some(t) => c_type = t.clone(),
            None => break,
        }
    }
    let rust = match c_type.as_str() {
        "__nv_bfloat16" => "half::bf16".to_string(),
        "float" => "f32".to_string(),
        "double" => "f64".to_string(),
        "int" | "int32_t" | "signed" | "signed int" => "i32".to_string(),
        "unsigned" | "unsigned int" | "uint32_t" => "u32".to_string(),
        "size_t" => "usize".to_string(),
        "uint64_t" | "unsigned long long" | "unsigned long long int" => "u64".to_string(),
        "int64_t" | "long long" | "long long int" => "i64".to_string(),
        "unsigned char" | "uint8_t" => "u8".to_string(),
        s if stars == 1 && structs.iter().any(|k| k == s) => s.to_string(),
        s => return Err(format!("no Rust type for the C type `{s}`")),
    };
    let kind = match (stars, is_const) {
        (0, _) => ParamKind::Scalar,
        (_, true) => ParamKind::In,
        (_, false) => ParamKind::Out,
    };
    Ok((name.to_string(), Ty { rust, kind }))
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

fn find_all(hay: &str, needle: &str) -> Vec<usize> {
    let mut v = Vec::new();
    let mut from = 0;
    while let Some(p) = hay[from..].find(needle) {
        let at = from + p;
        let word_start = at == 0 || !hay[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        if word_start {
            v.push(at);
        }
        from = at + needle.len();
    }
    v
}

/// Index of the `)` closing the `(` that `s` starts with (after whitespace).
fn matching_paren(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            c if depth == 0 && !c.is_whitespace() => return None,
            _ => {}
        }
    }
    None
}

fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        if in_str {
            out.push(b[i] as char);
            if b[i] == b'\\' && i + 1 < b.len() {
                out.push(b[i + 1] as char);
                i += 1;
            } else if b[i] == b'"' {
                in_str = false;
            }
            i += 1;
        } else if b[i] == b'"' {
            in_str = true;
            out.push('"');
            i += 1;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else {
            // Multi-byte UTF-8 outside comments and strings does not occur in a signature.
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// A function-like macro: parameters and body.
struct Macro {
    params: Vec<String>,
    body: String,
}

/// Removes every `#define` (continuations joined) from the text; returns the rest and the
/// function-like macros.
fn take_defines(text: &str) -> (String, BTreeMap<String, Macro>) {
    let mut rest = String::new();
    let mut macros = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if !(trimmed.starts_with('#') && trimmed[1..].trim_start().starts_with("define")) {
            rest.push_str(line);
            rest.push('\n');
            continue;
        }
        let mut full = line.to_string();
        while full.trim_end().ends_with('\\') {
            let t = full.trim_end();
            full = t[..t.len() - 1].to_string();
            full.push(' ');
            match lines.next() {
                Some(l) => full.push_str(l),
                None => break,
            }
            rest.push('\n');
        }
        rest.push('\n');
        let def = full.trim_start()[1..].trim_start()["define".len()..].trim_start();
        let name_end = def.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(def.len());
        let name = &def[..name_end];
        if def[name_end..].starts_with('(') {
            let close = def[name_end..].find(')').map(|c| c + name_end).unwrap_or(def.len());
            let params = def[name_end + 1..close]
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect();
            let body = def.get(close + 1..).unwrap_or("").to_string();
            macros.insert(name.to_string(), Macro { params, body });
        }
    }
    (rest, macros)
}

/// Expands, in place, every top-level invocation of a macro whose body declares a kernel.
fn expand_macros(text: &str, macros: &BTreeMap<String, Macro>) -> Result<String, String> {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        let name_end = t.find('(').unwrap_or(0);
        let name = &t[..name_end];
        match macros.get(name) {
            Some(m) if m.body.contains("__global__") => {
                let close = matching_paren(&t[name_end..])
                    .ok_or_else(|| format!("cannot read the invocation `{t}`"))?
                    + name_end;
                let args: Vec<&str> = t[name_end + 1..close].split(',').map(str::trim).collect();
                if args.len() != m.params.len() {
                    return Err(format!(
                        "`{t}`: macro {name} takes {} arguments, got {}",
                        m.params.len(),
                        args.len()
                    ));
                }
                out.push_str(&substitute(&m.body, &m.params, &args));
                out.push('\n');
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

fn substitute(body: &str, params: &[String], args: &[&str]) -> String {
    let mut out = String::new();
    let mut ident = String::new();
    let flush = |ident: &mut String, out: &mut String| {
        match params.iter().position(|p| p == ident) {
            Some(i) => out.push_str(args[i]),
            None => out.push_str(ident),
        }
        ident.clear();
    };
    for c in body.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            ident.push(c);
        } else {
            flush(&mut ident, &mut out);
            out.push(c);
        }
    }
    flush(&mut ident, &mut out);
    // Token pasting: `a ## b` → `ab`.
    while let Some(p) = out.find("##") {
        let left = out[..p].trim_end().len();
        let right = p + 2 + (out[p + 2..].len() - out[p + 2..].trim_start().len());
        out.replace_range(left..right, "");
    }
    out
}

/// Rust keywords that a C parameter may be named (`in`, `type`, ...).
fn rust_name(c: &str) -> String {
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "box", "break", "const", "continue", "crate", "dyn", "else", "enum",
        "extern", "false", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "match", "mod", "move",
        "mut", "pub", "ref", "return", "static", "struct", "super", "trait", "true", "type", "unsafe", "use",
        "where", "while", "yield",
    ];
    match c {
        "self" | "Self" | "crate" | "super" => format!("{c}_"),
        _ if KEYWORDS.contains(&c) => format!("r#{c}"),
        _ => c.to_string(),
    }
}

/// `KERNELS`: every kernel by module, in the order the launchers index them.
pub fn kernel_list(sigs: &Signatures) -> String {
    let mut by_module: Vec<(String, Vec<String>)> = Vec::new();
    for k in &sigs.kernels {
        match by_module.iter_mut().find(|(m, _)| *m == k.module) {
            Some((_, names)) => names.push(k.name.clone()),
            None => by_module.push((k.module.clone(), vec![k.name.clone()])),
        }
    }
    let mut code = String::from(
        "/// Every `extern \"C\" __global__` kernel of kernels/*.cu, by module (file stem), as build.rs\n\
         /// read them; the generated launchers index this list in order.\n\
         pub const KERNELS: &[(&str, &[&str])] = &[\n",
    );
    for (m, names) in by_module {
        code.push_str(&format!("    ({m:?}, &{names:?}),\n"));
    }
    code.push_str("];\n");
    code
}

/// The launchers, included by src/backend/cuda/launch.rs (which defines `In`, `Out`, `Kernels`).
pub fn launchers(sigs: &Signatures) -> String {
    let mut code = String::from("// Generated by build.rs from kernels/*.cu; do not edit.\n\n");
    for s in &sigs.structs {
        code.push_str(&format!(
            "/// `struct {}` of kernels/*.cu, field for field (pointers as device addresses).\n\
             #[repr(C)]\n#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]\npub struct {} {{\n",
            s.name, s.name
        ));
        for (f, t, c) in &s.fields {
            code.push_str(&format!("    /// `{c}`\n    pub {}: {t},\n", rust_name(f)));
        }
        code.push_str(&format!(
            "}}\n// SAFETY: plain old data with the C layout, every bit pattern valid.\n\
             unsafe impl cudarc::driver::DeviceRepr for {0} {{}}\n\
             // SAFETY: as above; all-zero is a null descriptor.\n\
             unsafe impl cudarc::driver::ValidAsZeroBits for {0} {{}}\n\n",
            s.name
        ));
    }
    for (index, k) in sigs.kernels.iter().enumerate() {
        code.push_str(&format!(
            "/// Launches `{}` of kernels/{}.cu:\n///\n/// ```text\n/// {}\n/// ```\n///\n\
             /// `const T*` parameters take an [`In<T>`] (a `CudaSlice<T>`, a view of one, or a\n\
             /// [`DevPtr<T>`]), `T*` ones an [`Out<T>`]; scalars take their C width.\n///\n\
             /// # Safety\n/// The kernel trusts its arguments: every buffer must hold what the \
             kernel reads and writes under `cfg`, and indices in them must be in range.\n\
             #[allow(clippy::too_many_arguments, non_snake_case, dead_code)]\n\
             pub unsafe fn {}(\n    stream: &CudaStream,\n    kernels: &Kernels,\n    cfg: LaunchConfig,\n",
            k.name, k.module, k.c_signature, k.name
        ));
        for p in &k.params {
            let ty = match p.kind {
                ParamKind::In => format!("&impl In<{}>", p.rust),
                ParamKind::Out => format!("&mut impl Out<{}>", p.rust),
                ParamKind::Scalar => p.rust.clone(),
            };
            code.push_str(&format!("    {}: {ty},\n", rust_name(&p.name)));
        }
        code.push_str(&format!(
            ") -> Result<(), DriverError> {{\n    let mut args = stream.launch_builder(kernels.function({index})?);\n"
        ));
        for p in &k.params {
            let n = rust_name(&p.name);
            match p.kind {
                ParamKind::Scalar => code.push_str(&format!("    args.arg(&{n});\n")),
                _ => code.push_str(&format!("    {n}.push(&mut args);\n")),
            }
        }
        code.push_str(&format!(
            "    let mark = kernels.timer.begin(stream)?;\n    \
             // SAFETY: the caller's contract above.\n    unsafe {{ args.launch(cfg) }}?;\n    \
             kernels.timer.end(stream, {:?}, mark)?;\n    Ok(())\n}}\n\n",
            k.name
        ));
    }
    code
}
