//! The small expression languages of declarative views: field paths, key expressions
//! (`brand.country_id`, `'en-GB'`, `sku + '-' + warehouse`) and `where` filters
//! (`status == 'active' and (price.amount < 1000 or not has(discount))`).
//!
//! Everything is parsed once, when the config is validated; evaluation never fails: a path that
//! does not resolve yields nothing (`null` for comparisons), so a row with odd data is filtered or
//! gets a `null` include instead of an error.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use serde_json::{Map, Value};

/// A dotted field path (`brand.country_id`). A segment of digits also indexes an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Path(Vec<String>);

impl Path {
    pub(crate) fn parse(s: &str) -> Result<Path, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("expected a field path such as `brand.country_id`, got nothing".into());
        }
        let mut segs = Vec::new();
        for seg in s.split('.') {
            if seg.is_empty() || !seg.chars().all(is_ident_char) {
                return Err(format!(
                    "invalid field path {s:?}: segments are letters, digits, '_' or '-', joined by '.'"
                ));
            }
            segs.push(seg.to_string());
        }
        Ok(Path(segs))
    }

    /// The value at this path in `row`, if every segment resolves.
    pub(crate) fn get<'a>(&self, row: &'a Map<String, Value>) -> Option<&'a Value> {
        let (first, rest) = self.0.split_first()?;
        let mut v = row.get(first)?;
        for seg in rest {
            v = match v {
                Value::Object(m) => m.get(seg)?,
                Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(v)
    }

    /// The first segment: the field of the row the path starts at.
    pub(crate) fn first(&self) -> &str {
        self.0.first().map_or("", String::as_str)
    }

    /// The last segment: the default name of a selected field.
    pub(crate) fn last(&self) -> &str {
        self.0.last().map_or("", String::as_str)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A value used as a key: a string as is, a number as its decimal text; anything else is not a key.
pub(crate) fn key_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Literal(String),
    Field(Path),
}

/// A key expression: field paths and quoted literals joined with `+`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyExpr(Vec<Term>);

impl KeyExpr {
    pub(crate) fn parse(s: &str) -> Result<KeyExpr, String> {
        let toks = tokenize(s)?;
        let mut terms = Vec::new();
        let mut want_term = true;
        for t in toks {
            match (want_term, t) {
                (true, Tok::Str(l)) => terms.push(Term::Literal(l)),
                (true, Tok::Ident(p)) => terms.push(Term::Field(Path::parse(&p)?)),
                (false, Tok::Plus) => {}
                (true, t) => {
                    return Err(format!(
                        "in key {s:?}: expected a field path or a quoted literal, got {t}"
                    ))
                }
                (false, t) => return Err(format!("in key {s:?}: expected `+`, got {t}")),
            }
            want_term = !want_term;
        }
        if terms.is_empty() || want_term {
            return Err(format!(
                "key {s:?} is incomplete: expected field paths or quoted literals joined by `+`"
            ));
        }
        Ok(KeyExpr(terms))
    }

    /// The key for `row`, or nothing when a field is absent or neither a string nor a number.
    pub(crate) fn eval<'a>(&self, row: &'a Map<String, Value>) -> Option<Cow<'a, str>> {
        if let [Term::Field(p)] = self.0.as_slice() {
            return key_text(p.get(row)?);
        }
        let mut out = String::new();
        for t in &self.0 {
            match t {
                Term::Literal(l) => out.push_str(l),
                Term::Field(p) => out.push_str(&key_text(p.get(row)?)?),
            }
        }
        Some(Cow::Owned(out))
    }

    /// The field paths this expression reads.
    pub(crate) fn paths(&self) -> impl Iterator<Item = &Path> {
        self.0.iter().filter_map(|t| match t {
            Term::Field(p) => Some(p),
            Term::Literal(_) => None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Operand {
    Field(Path),
    Const(Value),
}

impl Operand {
    fn paths<'a>(&'a self, f: &mut impl FnMut(&'a Path)) {
        if let Operand::Field(p) = self {
            f(p)
        }
    }

    fn eval<'a>(&'a self, row: &'a Map<String, Value>) -> &'a Value {
        match self {
            Operand::Field(p) => p.get(row).unwrap_or(&Value::Null),
            Operand::Const(v) => v,
        }
    }
}

/// A parsed `where` expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    /// `has(path)`: present and not null.
    Has(Path),
    Compare(Operand, Cmp, Operand),
    /// A bare operand: true when it holds `true`.
    Truthy(Operand),
}

impl Filter {
    pub(crate) fn parse(s: &str) -> Result<Filter, String> {
        let toks = tokenize(s)?;
        if toks.len() > MAX_FILTER_TOKENS {
            return Err(format!(
                "a filter of {} tokens is too long (at most {MAX_FILTER_TOKENS})",
                toks.len()
            ));
        }
        let mut p = Parser {
            toks,
            pos: 0,
            depth: 0,
        };
        let f = p.or().map_err(|e| format!("in {s:?}: {e}"))?;
        if let Some(t) = p.toks.get(p.pos) {
            return Err(format!(
                "in {s:?}: unexpected {t} after a complete expression"
            ));
        }
        Ok(f)
    }

    /// Calls `f` with every field path the filter reads.
    pub(crate) fn paths<'a>(&'a self, f: &mut impl FnMut(&'a Path)) {
        match self {
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.paths(f);
                b.paths(f);
            }
            Filter::Not(a) => a.paths(f),
            Filter::Has(p) => f(p),
            Filter::Truthy(o) => o.paths(f),
            Filter::Compare(a, _, b) => {
                a.paths(f);
                b.paths(f);
            }
        }
    }

    /// Bare words compared with something (`status == paid`: `status` and `paid`): each is
    /// read as a field, which is what the writer meant unless it was meant as text.
    pub(crate) fn compared_fields<'a>(&'a self, f: &mut impl FnMut(&'a Path)) {
        match self {
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.compared_fields(f);
                b.compared_fields(f);
            }
            Filter::Not(a) => a.compared_fields(f),
            Filter::Has(_) | Filter::Truthy(_) => {}
            Filter::Compare(a, _, b) => {
                for o in [a, b] {
                    if let Operand::Field(p) = o {
                        if p.0.len() == 1 {
                            f(p);
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn matches(&self, row: &Map<String, Value>) -> bool {
        match self {
            Filter::And(a, b) => a.matches(row) && b.matches(row),
            Filter::Or(a, b) => a.matches(row) || b.matches(row),
            Filter::Not(a) => !a.matches(row),
            Filter::Has(p) => p.get(row).is_some_and(|v| !v.is_null()),
            Filter::Truthy(o) => o.eval(row) == &Value::Bool(true),
            Filter::Compare(a, op, b) => compare(a.eval(row), *op, b.eval(row)),
        }
    }
}

fn compare(a: &Value, op: Cmp, b: &Value) -> bool {
    match op {
        Cmp::Eq => json_eq(a, b),
        Cmp::Ne => !json_eq(a, b),
        _ => {
            let ord = match (a, b) {
                (Value::Number(x), Value::Number(y)) => num_cmp(x, y),
                (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
                _ => None,
            };
            match ord {
                None => false,
                Some(o) => match op {
                    Cmp::Lt => o == Ordering::Less,
                    Cmp::Le => o != Ordering::Greater,
                    Cmp::Gt => o == Ordering::Greater,
                    _ => o != Ordering::Less,
                },
            }
        }
    }
}

/// Equality where numbers compare by value (`1 == 1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y) == Some(Ordering::Equal),
        _ => a == b,
    }
}

fn num_cmp(x: &serde_json::Number, y: &serde_json::Number) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return Some(a.cmp(&b));
    }
    if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        return Some(a.cmp(&b));
    }
    x.as_f64()?.partial_cmp(&y.as_f64()?)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(serde_json::Number),
    Op(Cmp),
    LParen,
    RParen,
    Plus,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Str(s) => write!(f, "'{s}'"),
            Tok::Num(n) => write!(f, "{n}"),
            Tok::Op(c) => f.write_str(match c {
                Cmp::Eq => "`==`",
                Cmp::Ne => "`!=`",
                Cmp::Lt => "`<`",
                Cmp::Le => "`<=`",
                Cmp::Gt => "`>`",
                Cmp::Ge => "`>=`",
            }),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::Plus => f.write_str("`+`"),
        }
    }
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut it = s.char_indices().peekable();
    while let Some(&(i, c)) = it.peek() {
        if c.is_whitespace() {
            it.next();
            continue;
        }
        match c {
            '(' => {
                it.next();
                out.push(Tok::LParen);
            }
            ')' => {
                it.next();
                out.push(Tok::RParen);
            }
            '+' => {
                it.next();
                out.push(Tok::Plus);
            }
            '=' | '!' | '<' | '>' => {
                it.next();
                let eq = it.next_if(|&(_, c)| c == '=').is_some();
                out.push(Tok::Op(match (c, eq) {
                    ('=', true) => Cmp::Eq,
                    ('!', true) => Cmp::Ne,
                    ('<', false) => Cmp::Lt,
                    ('<', true) => Cmp::Le,
                    ('>', false) => Cmp::Gt,
                    ('>', true) => Cmp::Ge,
                    _ => {
                        return Err(format!(
                            "unexpected {c:?} at offset {i} (comparisons are ==, !=, <, <=, >, >=)"
                        ))
                    }
                }));
            }
            '\'' | '"' => {
                it.next();
                let mut lit = String::new();
                let mut closed = false;
                while let Some((_, ch)) = it.next() {
                    if ch == c {
                        closed = true;
                        break;
                    }
                    if ch == '\\' {
                        match it.next() {
                            Some((_, e)) => lit.push(e),
                            None => break,
                        }
                    } else {
                        lit.push(ch);
                    }
                }
                if !closed {
                    return Err(format!("unterminated string starting at offset {i}"));
                }
                out.push(Tok::Str(lit));
            }
            c if c.is_ascii_digit() || c == '-' => {
                let b = s.as_bytes();
                let mut end = i + 1;
                while end < b.len()
                    && (b[end].is_ascii_alphanumeric()
                        || b[end] == b'.'
                        || (matches!(b[end], b'+' | b'-') && matches!(b[end - 1], b'e' | b'E')))
                {
                    end += 1;
                }
                while it.next_if(|&(k, _)| k < end).is_some() {}
                let text = &s[i..end];
                let n: serde_json::Number = text
                    .parse()
                    .map_err(|_| format!("invalid number {text:?} at offset {i}"))?;
                out.push(Tok::Num(n));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut end = i;
                while let Some(&(j, ch)) = it.peek() {
                    if is_ident_char(ch) || ch == '.' {
                        end = j + ch.len_utf8();
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Ident(s[i..end].to_string()));
            }
            '&' | '|' => {
                let word = if c == '&' { "and" } else { "or" };
                return Err(format!(
                    "unexpected {c:?} at offset {i}: write `{word}` (where uses and, or, not)"
                ));
            }
            other => return Err(format!("unexpected {other:?} at offset {i}")),
        }
    }
    Ok(out)
}

/// Bounds of a `where` filter. Parsing, evaluating and dropping a filter recurse over it, so an
/// unbounded one (thousands of nested `(` or `not`) overflowed the stack instead of being
/// refused. Chains of `and`/`or` nest one level per term, hence the token bound too.
const MAX_FILTER_TOKENS: usize = 1024;
const MAX_FILTER_NESTING: usize = 64;

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    /// Open `(` and `not` around the current position.
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn keyword(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(s)) if s == kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Filter, String> {
        let mut left = self.and()?;
        while self.keyword("or") {
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            left = Filter::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, String> {
        if self.depth >= MAX_FILTER_NESTING {
            return Err(format!(
                "parentheses and `not` nest deeper than {MAX_FILTER_NESTING} levels"
            ));
        }
        if self.keyword("not") {
            self.depth += 1;
            let f = self.unary();
            self.depth -= 1;
            return Ok(Filter::Not(Box::new(f?)));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            self.depth += 1;
            let f = self.or();
            self.depth -= 1;
            let f = f?;
            return match self.toks.get(self.pos) {
                Some(Tok::RParen) => {
                    self.pos += 1;
                    Ok(f)
                }
                Some(t) => Err(format!("expected `)`, got {t}")),
                None => Err("expected `)`, got the end".into()),
            };
        }
        if matches!(self.peek(), Some(Tok::Ident(s)) if s == "has")
            && self.toks.get(self.pos + 1) == Some(&Tok::LParen)
        {
            self.pos += 2;
            let path = match self.toks.get(self.pos) {
                Some(Tok::Ident(p)) => Path::parse(p)?,
                Some(t) => return Err(format!("has(...) takes a field path, got {t}")),
                None => return Err("has( is not closed".into()),
            };
            if self.toks.get(self.pos + 1) != Some(&Tok::RParen) {
                return Err("has(...) takes one field path and a `)`".into());
            }
            self.pos += 2;
            return Ok(Filter::Has(path));
        }
        let left = self.operand()?;
        if let Some(Tok::Op(op)) = self.peek() {
            let op = *op;
            self.pos += 1;
            let right = self.operand()?;
            return Ok(Filter::Compare(left, op, right));
        }
        Ok(Filter::Truthy(left))
    }

    fn operand(&mut self) -> Result<Operand, String> {
        let Some(t) = self.toks.get(self.pos).cloned() else {
            return Err("expected a field, a literal or `(`, got the end".into());
        };
        self.pos += 1;
        Ok(match t {
            Tok::Str(s) => Operand::Const(Value::String(s)),
            Tok::Num(n) => Operand::Const(Value::Number(n)),
            Tok::Ident(s) => match s.as_str() {
                "true" => Operand::Const(Value::Bool(true)),
                "false" => Operand::Const(Value::Bool(false)),
                "null" => Operand::Const(Value::Null),
                "and" | "or" | "not" => {
                    return Err(format!("expected a field or a literal, got `{s}`"))
                }
                _ => Operand::Field(Path::parse(&s)?),
            },
            other => return Err(format!("expected a field, a literal or `(`, got {other}")),
        })
    }
}

/// Parses `text` as a key expression and evaluates it on `row`: an entry point for the fuzz
/// targets in `fuzz/`, which keeps the expression types private.
#[doc(hidden)]
pub fn fuzz_key(text: &str, row: &Map<String, Value>) -> Result<Option<String>, String> {
    let k = KeyExpr::parse(text)?;
    k.paths().for_each(|p| {
        let _ = (p.first(), p.last(), p.to_string());
    });
    Ok(k.eval(row).map(Cow::into_owned))
}

/// Parses `text` as a `where` filter and tests it on `row`; see [`fuzz_key`].
#[doc(hidden)]
pub fn fuzz_filter(text: &str, row: &Map<String, Value>) -> Result<bool, String> {
    let f = Filter::parse(text)?;
    f.paths(&mut |p| {
        let _ = (p.first(), p.last(), p.to_string());
    });
    Ok(f.matches(row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn key_expressions() {
        let row = obj(
            json!({"id": "p1", "n": 42, "f": 1.5, "brand": {"country_id": "DE"}, "t": true, "a": ["x", "y"]}),
        );
        let k = |s: &str| {
            KeyExpr::parse(s)
                .unwrap()
                .eval(&row)
                .map(|k| k.into_owned())
        };
        assert_eq!(k("id"), Some("p1".into()));
        assert_eq!(k("n"), Some("42".into()));
        assert_eq!(k("f"), Some("1.5".into()));
        assert_eq!(k("brand.country_id"), Some("DE".into()));
        assert_eq!(k("'en-GB'"), Some("en-GB".into()));
        assert_eq!(k("id + ':' + brand.country_id"), Some("p1:DE".into()));
        assert_eq!(k("a.1"), Some("y".into()));
        assert_eq!(k("t"), None);
        assert_eq!(k("missing"), None);
        assert_eq!(k("id + missing"), None);
        assert_eq!(k("brand"), None);
        for bad in [
            "", "id +", "+ id", "id id", "id..x", "'open", "id == 1", "(id)",
        ] {
            assert!(KeyExpr::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn filters() {
        let row = obj(
            json!({"status": "active", "price": {"amount": 999}, "n": 1.0, "flag": true, "nul": null}),
        );
        let f = |s: &str| Filter::parse(s).unwrap().matches(&row);
        assert!(f("status == 'active'"));
        assert!(f("status != \"discontinued\""));
        assert!(f("price.amount < 1000 and price.amount >= 999"));
        assert!(!f("price.amount > 999"));
        assert!(f("n == 1"));
        assert!(f("flag"));
        assert!(!f("not flag"));
        assert!(f("has(price) and not has(discount) and not has(nul)"));
        assert!(f("missing == null and nul == null"));
        assert!(f("status == 'x' or (flag and n <= 1)"));
        assert!(!f("status < 5"));
        assert!(f("status > 'a'"));
        assert!(f("-1 < n"));
        assert!(f("1e0 == n"));
        for bad in [
            "",
            "status ==",
            "status = 'x'",
            "(status == 'x'",
            "status == 'x')",
            "has(1)",
            "a == b c",
            "and",
            "status === 'x'",
            "'unterminated",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn c_style_boolean_operators_get_a_hint() {
        let e = Filter::parse("status == 'paid' && total > 5").unwrap_err();
        assert!(e.contains("write `and`"), "{e}");
        let e = Filter::parse("a || b").unwrap_err();
        assert!(e.contains("write `or`"), "{e}");
    }

    #[test]
    fn deeply_nested_filters_are_refused_not_a_stack_overflow() {
        // The first two overflowed the stack when run through the `view_expr` fuzz target; the
        // third builds a tree as deep as the chain is long.
        let deep_not = format!("{}x", "not ".repeat(50_000));
        let deep_paren = format!("{}x{}", "(".repeat(30_000), ")".repeat(30_000));
        let long_and = vec!["x"; 50_000].join(" and ");
        for s in [deep_not, deep_paren, long_and] {
            assert!(Filter::parse(&s).is_err(), "{} parsed", &s[..20]);
        }
        let nested = format!("{}x{}", "(not ".repeat(30), ")".repeat(30));
        // 30 levels of `not` (60 of nesting) are fine, and cancel out.
        assert!(Filter::parse(&nested)
            .unwrap()
            .matches(&obj(json!({"x": true}))));
    }
}
