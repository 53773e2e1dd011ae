//! SQL injection, found by tokenizing SQL rather than by looking for keywords.
//!
//! Two questions are asked. Of a whole query (a PostgreSQL or MySQL query message), where
//! every byte is SQL by design: does it carry the shapes injected SQL leaves behind — an
//! `OR` followed by a comparison of two literals (`OR 1=1`, `OR 'a'='a'`), a `UNION SELECT`
//! of placeholders or of the system catalogs, a string closed and a comment opened with
//! nothing between (`'admin'--`), a second statement that destroys or executes after a
//! filtered one, or a function that exists to stall or to read files. Of a piece of user
//! input (an HTTP parameter, header or form field): placed into a query as a number, or
//! inside a single- or double-quoted string, does it break out and form one of those
//! shapes. `O'Brien` closes a string and goes on as a name, which is no shape; `x' OR
//! '1'='1` closes it and compares two literals after an `OR`.
//!
//! The tokenizer is total over arbitrary bytes and never allocates more than one token
//! vector per call, bounded by [`MAX_TOKENS`].

/// Tokens looked at per query or input; the rest is not examined.
pub const MAX_TOKENS: usize = 512;

/// A token's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tok {
    /// A string literal, closed or not.
    Str {
        /// Whether its closing quote was seen.
        closed: bool,
    },
    /// A number.
    Num,
    /// A keyword (by [`Kw`]).
    Kw(Kw),
    /// Any other identifier.
    Ident,
    /// A comparison operator (`=`, `<`, `>`, `<=`, `>=`, `<>`, `!=`, `LIKE`).
    Cmp,
    /// `||` or `&&` (MySQL's OR and AND when not in ANSI mode).
    LogicOp,
    /// Other operators and punctuation.
    Op,
    /// `(`.
    Open,
    /// `)`.
    Close,
    /// `,`.
    Comma,
    /// `;`.
    Semi,
    /// A comment (`--`, `#`, `/* */`).
    Comment,
}

macro_rules! keywords {
    ($($v:ident => $s:literal,)*) => {
        /// Keywords the detector knows (each the SQL word of its name).
        #[allow(missing_docs)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Kw { $($v,)* }
        fn keyword(w: &[u8]) -> Option<Kw> {
            $(if w.eq_ignore_ascii_case($s.as_bytes()) { return Some(Kw::$v); })*
            None
        }
    };
}

keywords! {
    Select => "select", Union => "union", All => "all", Distinct => "distinct", From => "from",
    Where => "where", And => "and", Or => "or", Xor => "xor", Not => "not", Null => "null",
    True => "true", False => "false", Like => "like", Drop => "drop", Delete => "delete",
    Update => "update", Insert => "insert", Truncate => "truncate", Alter => "alter",
    Create => "create", Shutdown => "shutdown", Exec => "exec", Execute => "execute",
    Copy => "copy", Program => "program", Into => "into", Outfile => "outfile",
    Dumpfile => "dumpfile", Sleep => "sleep", PgSleep => "pg_sleep", Benchmark => "benchmark",
    Waitfor => "waitfor", Delay => "delay", LoadFile => "load_file", XpCmdshell => "xp_cmdshell",
    InformationSchema => "information_schema", PgCatalog => "pg_catalog", PgShadow => "pg_shadow",
    PgUser => "pg_user", SqliteMaster => "sqlite_master", Version => "version",
    CurrentUser => "current_user", Database => "database", User => "user", Having => "having",
    Order => "order", By => "by",
}

/// One token: its kind and where it is in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// Kind.
    pub tok: Tok,
    /// Byte offset.
    pub at: usize,
    /// Whitespace came right before it.
    pub spaced: bool,
}

/// Tokenizes `s`, at most [`MAX_TOKENS`] tokens. `quote` starts the input inside a string
/// opened by that quote character (the input's first unescaped quote of that kind closes
/// it): how user input placed between quotes in a query is read.
pub fn tokenize(s: &[u8], quote: Option<u8>) -> Vec<Token> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut spaced = false;
    if let Some(q) = quote {
        let (end, closed) = string_end(s, 0, q);
        out.push(Token {
            tok: Tok::Str { closed },
            at: 0,
            spaced: false,
        });
        i = end;
    }
    while i < s.len() && out.len() < MAX_TOKENS {
        let c = s[i];
        let at = i;
        let tok = match c {
            b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c => {
                spaced = true;
                i += 1;
                continue;
            }
            b'\'' | b'"' | b'`' => {
                let (end, closed) = string_end(s, i + 1, c);
                i = end;
                if c == b'`' {
                    Tok::Ident
                } else {
                    Tok::Str { closed }
                }
            }
            b'-' if s.get(i + 1) == Some(&b'-') => {
                i = line_end(s, i);
                Tok::Comment
            }
            b'#' => {
                i = line_end(s, i);
                Tok::Comment
            }
            b'/' if s.get(i + 1) == Some(&b'*') => {
                i = s[i + 2..]
                    .windows(2)
                    .position(|w| w == b"*/")
                    .map_or(s.len(), |p| i + 2 + p + 2);
                Tok::Comment
            }
            b'0'..=b'9' => {
                i += 1;
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'.') {
                    i += 1;
                }
                Tok::Num
            }
            b'.' if s.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i += 1;
                while i < s.len() && s[i].is_ascii_digit() {
                    i += 1;
                }
                Tok::Num
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b'@' || c == b'$' || c >= 0x80 => {
                while i < s.len()
                    && (s[i].is_ascii_alphanumeric()
                        || matches!(s[i], b'_' | b'@' | b'$' | b'.')
                        || s[i] >= 0x80)
                {
                    i += 1;
                }
                let w = &s[at..i];
                // `schema.table`: the schema names it.
                let head = w.split(|&b| b == b'.').next().unwrap_or(w);
                match keyword(head) {
                    Some(Kw::Like) => Tok::Cmp,
                    Some(k) => Tok::Kw(k),
                    None => Tok::Ident,
                }
            }
            b'=' => {
                i += 1;
                Tok::Cmp
            }
            b'<' | b'>' | b'!' => {
                i += 1;
                if matches!(s.get(i), Some(b'=' | b'>')) {
                    i += 1;
                }
                if c == b'!' && i == at + 1 {
                    Tok::Op
                } else {
                    Tok::Cmp
                }
            }
            b'|' | b'&' if s.get(i + 1) == Some(&c) => {
                i += 2;
                Tok::LogicOp
            }
            _ => {
                i += 1;
                match c {
                    b'(' => Tok::Open,
                    b')' => Tok::Close,
                    b',' => Tok::Comma,
                    b';' => Tok::Semi,
                    _ => Tok::Op,
                }
            }
        };
        out.push(Token { tok, at, spaced });
        spaced = false;
    }
    out
}

/// Where a string opened before `from` by `q` ends, and whether it was closed. A doubled
/// quote and a backslash escape stay inside it.
fn string_end(s: &[u8], from: usize, q: u8) -> (usize, bool) {
    let mut i = from;
    while i < s.len() {
        if s[i] == b'\\' {
            i += 2;
            continue;
        }
        if s[i] == q {
            if s.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return (i + 1, true);
        }
        i += 1;
    }
    (s.len(), false)
}

fn line_end(s: &[u8], i: usize) -> usize {
    s[i..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(s.len(), |p| i + p)
}

/// Which shape of injection was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `OR` followed by a comparison of two literals (or a bare true literal).
    Tautology,
    /// `UNION SELECT` of placeholders, or of the catalogs.
    Union,
    /// A string closed and a comment opened at once: the rest of the query cut off.
    CommentCut,
    /// A destructive or executing statement stacked after a filtered one.
    Stacked,
    /// A function that stalls the server (blind, time-based).
    TimeDelay,
    /// A function or clause that reads or writes server files or runs commands.
    FileOrCommand,
}

impl Shape {
    /// Stable name (records, metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Tautology => "tautology",
            Shape::Union => "union",
            Shape::CommentCut => "comment_cut",
            Shape::Stacked => "stacked_query",
            Shape::TimeDelay => "time_delay",
            Shape::FileOrCommand => "file_or_command",
        }
    }
}

/// A finding: its shape and the byte offset of the token where it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// The shape.
    pub shape: Shape,
    /// Offset in the input.
    pub at: usize,
}

fn is_literal(t: Tok) -> bool {
    matches!(
        t,
        Tok::Num | Tok::Str { .. } | Tok::Kw(Kw::Null | Kw::True | Kw::False)
    )
}

fn is_or(t: Tok) -> bool {
    matches!(t, Tok::Kw(Kw::Or | Kw::Xor) | Tok::LogicOp)
}

/// The shapes of injection in a token stream. `input` is set when the tokens come from
/// user input (so a `WHERE` before a stacked statement is implied by the query it was
/// placed in).
pub fn shapes(toks: &[Token], input: bool) -> Option<Hit> {
    let kind = |i: usize| toks.get(i).map(|t| t.tok);
    let mut filtered = input;
    for (i, t) in toks.iter().enumerate() {
        let hit = |shape| Some(Hit { shape, at: t.at });
        match t.tok {
            Tok::Kw(Kw::Where | Kw::Having) => filtered = true,
            // OR <literal> <cmp> <literal>, or OR <true literal> at the end.
            tk if is_or(tk) => {
                // Parentheses opened after the OR (`') OR ('1'='1`) do not change it.
                let mut j = i + 1;
                while kind(j) == Some(Tok::Open) {
                    j += 1;
                }
                let a = kind(j);
                let (b, c) = (kind(j + 1), kind(j + 2));
                if a.is_some_and(is_literal) && b == Some(Tok::Cmp) && c.is_some_and(is_literal) {
                    return hit(Shape::Tautology);
                }
                // `OR true` closing the input (or before a comment, `)` or `;`), and
                // `OR 1` before a comment (`1 or 2` alone is ordinary text).
                let closing = matches!(b, None | Some(Tok::Comment | Tok::Close | Tok::Semi));
                if (a == Some(Tok::Kw(Kw::True)) && closing)
                    || (a == Some(Tok::Num) && b == Some(Tok::Comment))
                {
                    return hit(Shape::Tautology);
                }
            }
            Tok::Kw(Kw::Union) => {
                let mut j = i + 1;
                if matches!(kind(j), Some(Tok::Kw(Kw::All | Kw::Distinct))) {
                    j += 1;
                }
                if kind(j) == Some(Tok::Kw(Kw::Select)) {
                    if input {
                        return hit(Shape::Union);
                    }
                    // The select list and its FROM: placeholders only, or catalogs.
                    let rest = &toks[j + 1..];
                    let end = rest
                        .iter()
                        .position(|t| matches!(t.tok, Tok::Kw(Kw::Union) | Tok::Semi))
                        .unwrap_or(rest.len());
                    let list_end = rest[..end]
                        .iter()
                        .position(|t| t.tok == Tok::Kw(Kw::From))
                        .unwrap_or(end);
                    let list = &rest[..list_end];
                    let placeholders = !list.is_empty()
                        && list.iter().all(|t| {
                            matches!(
                                t.tok,
                                Tok::Num | Tok::Kw(Kw::Null) | Tok::Comma | Tok::Str { .. }
                            )
                        });
                    let catalog = rest[..end].iter().any(|t| {
                        matches!(
                            t.tok,
                            Tok::Kw(
                                Kw::InformationSchema
                                    | Kw::PgCatalog
                                    | Kw::PgShadow
                                    | Kw::PgUser
                                    | Kw::SqliteMaster
                                    | Kw::Version
                                    | Kw::CurrentUser
                                    | Kw::Database
                            )
                        )
                    });
                    if placeholders || catalog {
                        return hit(Shape::Union);
                    }
                }
            }
            // A string closed and a comment opened at once. In a query only when nothing
            // stands between them (`'admin'--`); in input, whatever white space does (the
            // input itself closed the string its query opened).
            Tok::Str { closed: true } if !input || i == 0 => {
                if let Some(n) = toks.get(i + 1) {
                    if n.tok == Tok::Comment && (input || !n.spaced) {
                        return hit(Shape::CommentCut);
                    }
                }
            }
            Tok::Semi if filtered => {
                // After a filtered statement: what destroys or executes, always; what
                // writes, only from user input (a batch of updates is ordinary SQL).
                if let Some(Tok::Kw(k)) = kind(i + 1) {
                    let destroys = matches!(
                        k,
                        Kw::Drop | Kw::Truncate | Kw::Shutdown | Kw::Exec | Kw::Execute | Kw::Alter
                    );
                    let writes = matches!(
                        k,
                        Kw::Delete | Kw::Update | Kw::Insert | Kw::Create | Kw::Copy
                    );
                    if destroys || (input && writes) {
                        return hit(Shape::Stacked);
                    }
                }
            }
            Tok::Kw(Kw::Sleep | Kw::PgSleep | Kw::Benchmark) if kind(i + 1) == Some(Tok::Open) => {
                return hit(Shape::TimeDelay);
            }
            Tok::Kw(Kw::Waitfor) if kind(i + 1) == Some(Tok::Kw(Kw::Delay)) => {
                return hit(Shape::TimeDelay);
            }
            Tok::Kw(Kw::LoadFile) if kind(i + 1) == Some(Tok::Open) => {
                return hit(Shape::FileOrCommand);
            }
            Tok::Kw(Kw::XpCmdshell) => return hit(Shape::FileOrCommand),
            Tok::Kw(Kw::Into)
                if matches!(kind(i + 1), Some(Tok::Kw(Kw::Outfile | Kw::Dumpfile))) =>
            {
                return hit(Shape::FileOrCommand);
            }
            Tok::Kw(Kw::Program) if toks[..i].iter().any(|t| t.tok == Tok::Kw(Kw::Copy)) => {
                return hit(Shape::FileOrCommand);
            }
            _ => {}
        }
    }
    None
}

/// Injection shapes in a whole query.
pub fn in_query(q: &[u8]) -> Option<Hit> {
    shapes(&tokenize(q, None), false)
}

/// Injection shapes in user input, read as a bare value, and inside a single- and a
/// double-quoted string.
pub fn in_input(v: &[u8]) -> Option<Hit> {
    // Plain words and numbers cannot inject: skip the tokenizer for them.
    if v.iter().all(|&c| {
        c.is_ascii_alphanumeric() || matches!(c, b' ' | b'.' | b'_' | b'@' | b':' | b'/' | b'+')
    }) {
        let t = tokenize(v, None);
        return shapes(&t, true).filter(|_| starts_like_value(&t));
    }
    let bare = tokenize(v, None);
    if starts_like_value(&bare) {
        if let Some(h) = shapes(&bare, true) {
            return Some(h);
        }
    }
    for q in [b'\'', b'"'] {
        if !v.contains(&q) {
            continue;
        }
        let t = tokenize(v, Some(q));
        if matches!(t.first().map(|t| t.tok), Some(Tok::Str { closed: true })) {
            if let Some(h) = shapes(&t, true) {
                return Some(h);
            }
        }
    }
    None
}

/// A bare value placed into a query as a number or a name: it must start like one, and go
/// on into SQL.
fn starts_like_value(t: &[Token]) -> bool {
    // A sign before a number (`-1 UNION ...`) is part of the value.
    let t = match t {
        [first, rest @ ..]
            if first.tok == Tok::Op && rest.first().is_some_and(|n| n.tok == Tok::Num) =>
        {
            rest
        }
        _ => t,
    };
    matches!(t.first().map(|t| t.tok), Some(Tok::Num | Tok::Ident)) && t.len() > 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Option<&'static str> {
        in_query(s.as_bytes()).map(|h| h.shape.as_str())
    }
    fn i(s: &str) -> Option<&'static str> {
        in_input(s.as_bytes()).map(|h| h.shape.as_str())
    }

    #[test]
    fn injected_queries_are_found() {
        assert_eq!(
            q("SELECT * FROM users WHERE name = '' OR '1'='1'"),
            Some("tautology")
        );
        assert_eq!(
            q("SELECT * FROM users WHERE id = 1 OR 1=1"),
            Some("tautology")
        );
        assert_eq!(q("select * from t where a='x' || 2>1"), Some("tautology"));
        assert_eq!(
            q("SELECT name FROM items WHERE id = 3 UNION SELECT NULL, NULL"),
            Some("union")
        );
        assert_eq!(
            q("SELECT a FROM t WHERE id=1 UNION ALL SELECT usename, passwd FROM pg_shadow"),
            Some("union")
        );
        assert_eq!(
            q("SELECT * FROM users WHERE u='admin'--' AND p='x'"),
            Some("comment_cut")
        );
        assert_eq!(
            q("SELECT * FROM t WHERE id=1; DROP TABLE cards"),
            Some("stacked_query")
        );
        assert_eq!(
            q("SELECT * FROM t WHERE id=1 AND pg_sleep(5) IS NULL"),
            Some("time_delay")
        );
        assert_eq!(
            q("SELECT 1 WHERE 1=1; WAITFOR DELAY '0:0:5'"),
            Some("time_delay")
        );
        assert_eq!(
            q("SELECT load_file('/etc/passwd')"),
            Some("file_or_command")
        );
        assert_eq!(q("COPY t TO PROGRAM 'sh -c id'"), Some("file_or_command"));
    }

    #[test]
    fn ordinary_queries_are_not() {
        for s in [
            "SELECT * FROM accounts WHERE id = $1",
            "SELECT 1",
            "BEGIN; UPDATE accounts SET balance = balance - 10 WHERE aid = 5; COMMIT;",
            "UPDATE a SET x = 1 WHERE id = 1; UPDATE a SET x = 2 WHERE id = 2;",
            "SELECT a FROM t1 UNION SELECT a FROM t2",
            "SELECT * FROM t WHERE 1=1 AND name LIKE 'a%'",
            "SELECT * FROM orders WHERE status = 'paid' OR status = 'shipped'",
            "INSERT INTO t (a, b) VALUES ('it''s', 2) -- a comment",
            "select count(*) from pg_catalog.pg_class",
            "CREATE TABLE t (id int); INSERT INTO t VALUES (1);",
            "SET search_path = public",
            "SELECT * FROM t WHERE a = 'x' /* note */",
        ] {
            assert_eq!(q(s), None, "{s}");
        }
    }

    #[test]
    fn injected_input_is_found_and_ordinary_input_is_not() {
        assert_eq!(i("x' OR '1'='1"), Some("tautology"));
        assert_eq!(i("1 OR 1=1"), Some("tautology"));
        assert_eq!(i("admin'--"), Some("comment_cut"));
        assert_eq!(i("1 UNION SELECT password FROM users"), Some("union"));
        assert_eq!(i("x\" or \"a\"=\"a"), Some("tautology"));
        assert_eq!(i("1; DROP TABLE users"), Some("stacked_query"));
        assert_eq!(i("1 AND SLEEP(5)"), Some("time_delay"));
        for ok in [
            "O'Brien",
            "rock and roll",
            "John \"Johnny\" Smith",
            "1=1 is true",
            "select your size",
            "it's 5 o'clock",
            "a-b--c",
            "user@example.com",
            "SELECT",
            "union station",
            "42",
            "or 1",
        ] {
            assert_eq!(i(ok), None, "{ok}");
        }
    }

    #[test]
    fn the_tokenizer_is_total() {
        let mut b = Vec::new();
        for n in 0..2000u32 {
            b.push((n.wrapping_mul(2654435761) >> 24) as u8);
            let _ = tokenize(&b, None);
            let _ = tokenize(&b, Some(b'\''));
            let _ = in_input(&b);
        }
    }
}
