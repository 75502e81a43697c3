//! Typed values as the wire carries them, and the types they are checked against.
//!
//! A procedure's parameters and result are WIT types; the router, SDK and CLI know them only
//! from the procedure list, so any new module works without code changes here. This module
//! parses CLI text against a type, checks received values against a type, prints values the
//! way Tarantool's console did, and encodes both types and values in the compact binary form
//! described in `docs/protocol.md`.

use std::fmt;

use billcl_money::Decimal;

use crate::codec::{Reader, Writer};
use crate::error::Error;

/// How deep values and types may nest (a list of records of lists … counts one per level).
pub const VALUE_DEPTH_MAX: usize = 32;

/// A WIT type, as a procedure's parameters and result are declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Type {
    Bool,
    S8,
    S16,
    S32,
    S64,
    U8,
    U16,
    U32,
    U64,
    F32,
    F64,
    Char,
    String,
    /// billcl's exact money type (`decimal` in the host WIT, carried as micro-units).
    Decimal,
    List(Box<Type>),
    Option(Box<Type>),
    Result {
        ok: Option<Box<Type>>,
        err: Option<Box<Type>>,
    },
    Tuple(Vec<Type>),
    Record(Vec<(String, Type)>),
    Enum(Vec<String>),
    Variant(Vec<(String, Option<Type>)>),
    Flags(Vec<String>),
}

/// A value of some [`Type`]. Signed integers travel as `Int`, unsigned ones as `Uint`, both
/// floats as `Float`.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Char(char),
    String(String),
    Decimal(Decimal),
    List(Vec<Value>),
    Option(Option<Box<Value>>),
    Result(Result<Option<Box<Value>>, Option<Box<Value>>>),
    Tuple(Vec<Value>),
    Record(Vec<(String, Value)>),
    Enum(String),
    Variant(String, Option<Box<Value>>),
    Flags(Vec<String>),
}

// ---------------------------------------------------------------------------------------------
// Display

fn write_list<T>(
    f: &mut fmt::Formatter<'_>,
    items: &[T],
    mut each: impl FnMut(&mut fmt::Formatter<'_>, &T) -> fmt::Result,
) -> fmt::Result {
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            f.write_str(", ")?;
        }
        each(f, item)?;
    }
    Ok(())
}

impl fmt::Display for Type {
    /// WIT syntax: `u64`, `decimal`, `list<u8>`, `option<string>`, `result<bool, string>`,
    /// `tuple<u64, decimal>`, `record { id: u64, balance: decimal }`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Bool => f.write_str("bool"),
            Type::S8 => f.write_str("s8"),
            Type::S16 => f.write_str("s16"),
            Type::S32 => f.write_str("s32"),
            Type::S64 => f.write_str("s64"),
            Type::U8 => f.write_str("u8"),
            Type::U16 => f.write_str("u16"),
            Type::U32 => f.write_str("u32"),
            Type::U64 => f.write_str("u64"),
            Type::F32 => f.write_str("f32"),
            Type::F64 => f.write_str("f64"),
            Type::Char => f.write_str("char"),
            Type::String => f.write_str("string"),
            Type::Decimal => f.write_str("decimal"),
            Type::List(item) => write!(f, "list<{item}>"),
            Type::Option(inner) => write!(f, "option<{inner}>"),
            Type::Result {
                ok: None,
                err: None,
            } => f.write_str("result"),
            Type::Result {
                ok: Some(ok),
                err: None,
            } => write!(f, "result<{ok}>"),
            Type::Result {
                ok: None,
                err: Some(err),
            } => write!(f, "result<_, {err}>"),
            Type::Result {
                ok: Some(ok),
                err: Some(err),
            } => write!(f, "result<{ok}, {err}>"),
            Type::Tuple(items) => {
                f.write_str("tuple<")?;
                write_list(f, items, |f, item| write!(f, "{item}"))?;
                f.write_str(">")
            }
            Type::Record(fields) => {
                f.write_str("record { ")?;
                write_list(f, fields, |f, (name, ty)| write!(f, "{name}: {ty}"))?;
                f.write_str(" }")
            }
            Type::Enum(cases) => {
                f.write_str("enum { ")?;
                write_list(f, cases, |f, case| f.write_str(case))?;
                f.write_str(" }")
            }
            Type::Variant(cases) => {
                f.write_str("variant { ")?;
                write_list(f, cases, |f, (name, payload)| match payload {
                    Some(ty) => write!(f, "{name}({ty})"),
                    None => f.write_str(name),
                })?;
                f.write_str(" }")
            }
            Type::Flags(names) => {
                f.write_str("flags { ")?;
                write_list(f, names, |f, name| f.write_str(name))?;
                f.write_str(" }")
            }
        }
    }
}

impl fmt::Display for Value {
    /// Readable, like Tarantool's console: `[4, 1000, 0]` for tuples and lists,
    /// `{id: 4, balance: 1.5}` for records, strings `"quoted"`, none as `null`, decimals without
    /// trailing zeros, `ok(v)` as `v` and `err(e)` as `error(e)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(value) => write!(f, "{value}"),
            Value::Int(value) => write!(f, "{value}"),
            Value::Uint(value) => write!(f, "{value}"),
            Value::Float(value) => write!(f, "{value}"),
            Value::Char(value) => write!(f, "{:?}", value.to_string()),
            Value::String(value) => write!(f, "{value:?}"),
            Value::Decimal(value) => write!(f, "{value}"),
            Value::List(items) | Value::Tuple(items) => {
                f.write_str("[")?;
                write_list(f, items, |f, item| write!(f, "{item}"))?;
                f.write_str("]")
            }
            Value::Option(None) => f.write_str("null"),
            Value::Option(Some(inner)) => write!(f, "{inner}"),
            Value::Result(Ok(Some(inner))) => write!(f, "{inner}"),
            Value::Result(Ok(None)) => f.write_str("ok"),
            Value::Result(Err(Some(inner))) => write!(f, "error({inner})"),
            Value::Result(Err(None)) => f.write_str("error"),
            Value::Record(fields) => {
                f.write_str("{")?;
                write_list(f, fields, |f, (name, value)| write!(f, "{name}: {value}"))?;
                f.write_str("}")
            }
            Value::Enum(case) => f.write_str(case),
            Value::Variant(case, None) => f.write_str(case),
            Value::Variant(case, Some(payload)) => write!(f, "{case}({payload})"),
            Value::Flags(names) => {
                f.write_str("[")?;
                write_list(f, names, |f, name| f.write_str(name))?;
                f.write_str("]")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Integer ranges

/// The range of an integer type, or `None` for other types.
fn int_range(ty: &Type) -> Option<(i128, i128)> {
    Some(match ty {
        Type::S8 => (i128::from(i8::MIN), i128::from(i8::MAX)),
        Type::S16 => (i128::from(i16::MIN), i128::from(i16::MAX)),
        Type::S32 => (i128::from(i32::MIN), i128::from(i32::MAX)),
        Type::S64 => (i128::from(i64::MIN), i128::from(i64::MAX)),
        Type::U8 => (0, i128::from(u8::MAX)),
        Type::U16 => (0, i128::from(u16::MAX)),
        Type::U32 => (0, i128::from(u32::MAX)),
        Type::U64 => (0, i128::from(u64::MAX)),
        _ => return None,
    })
}

fn is_signed(ty: &Type) -> bool {
    matches!(ty, Type::S8 | Type::S16 | Type::S32 | Type::S64)
}

/// A short hint of what text a type expects, for error messages.
fn hint(ty: &Type) -> String {
    if let Some((min, max)) = int_range(ty) {
        return format!(" (a whole number from {min} to {max})");
    }
    match ty {
        Type::Bool => " (true or false)".into(),
        Type::F32 | Type::F64 => " (e.g. 1.5)".into(),
        Type::Char => " (one character)".into(),
        Type::String => " (e.g. \"text\")".into(),
        Type::Decimal => " (e.g. 1000 or 0.5)".into(),
        Type::List(_) => " (e.g. [1, 2])".into(),
        Type::Option(_) => " (null or a value)".into(),
        Type::Result { .. } => " (ok(…) or err(…))".into(),
        Type::Tuple(_) => " (e.g. [1, \"x\"])".into(),
        Type::Record(fields) => {
            let names: Vec<String> = fields
                .iter()
                .map(|(name, _)| format!("{name}: …"))
                .collect();
            format!(" (e.g. {{{}}})", names.join(", "))
        }
        Type::Enum(cases) | Type::Flags(cases) => {
            let prefix = if matches!(ty, Type::Flags(_)) {
                "a list of "
            } else {
                ""
            };
            format!(" ({prefix}one of {})", cases.join(", "))
        }
        Type::Variant(cases) => {
            let names: Vec<&str> = cases.iter().map(|(name, _)| name.as_str()).collect();
            format!(" (one of {})", names.join(", "))
        }
        _ => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing CLI text

/// A token of the JSON-ish argument syntax.
enum Atom<'a> {
    Quoted(String),
    Bare(&'a str),
}

impl Atom<'_> {
    fn text(&self) -> &str {
        match self {
            Atom::Quoted(text) => text,
            Atom::Bare(text) => text,
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    position: usize,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.position..]
    }

    fn skip_whitespace(&mut self) {
        let rest = self.rest();
        self.position += rest.len() - rest.trim_start().len();
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_whitespace();
        self.rest().chars().next()
    }

    fn eat(&mut self, expected: char) -> bool {
        if self.peek() == Some(expected) {
            self.position += expected.len_utf8();
            true
        } else {
            false
        }
    }

    /// What is left, shortened, for "got `…`" in messages.
    fn got(&mut self) -> String {
        self.skip_whitespace();
        let rest = self.rest();
        if rest.is_empty() {
            return "the end of the argument".into();
        }
        let shown: String = rest.chars().take(40).collect();
        let ellipsis = if shown.len() < rest.len() { "…" } else { "" };
        format!("`{shown}{ellipsis}`")
    }

    fn expected(&mut self, ty: &Type) -> String {
        format!("expected {ty}{}, got {}", hint(ty), self.got())
    }

    fn atom(&mut self) -> Result<Atom<'a>, String> {
        match self.peek() {
            Some(quote @ ('"' | '\'')) => {
                self.position += 1;
                let mut text = String::new();
                let mut chars = self.rest().char_indices();
                while let Some((offset, char)) = chars.next() {
                    match char {
                        _ if char == quote => {
                            self.position += offset + 1;
                            return Ok(Atom::Quoted(text));
                        }
                        '\\' => match chars.next().map(|(_, escaped)| escaped) {
                            Some('n') => text.push('\n'),
                            Some('t') => text.push('\t'),
                            Some('r') => text.push('\r'),
                            Some('0') => text.push('\0'),
                            Some(escaped @ ('\\' | '"' | '\'')) => text.push(escaped),
                            Some(other) => return Err(format!("unknown escape `\\{other}`")),
                            None => break,
                        },
                        _ => text.push(char),
                    }
                }
                Err(format!("string starting at `{quote}` is never closed"))
            }
            _ => {
                let rest = self.rest();
                let end = rest
                    .find(|c: char| c.is_whitespace() || ",:[](){}\"'".contains(c))
                    .unwrap_or(rest.len());
                self.position += end;
                Ok(Atom::Bare(&rest[..end]))
            }
        }
    }

    fn bare(&mut self, ty: &Type) -> Result<&'a str, String> {
        let start = self.position;
        match self.atom()? {
            Atom::Bare(word) if !word.is_empty() => Ok(word),
            _ => {
                self.position = start;
                Err(self.expected(ty))
            }
        }
    }

    fn close(&mut self, close: char, ty: &Type) -> Result<(), String> {
        if self.eat(close) {
            Ok(())
        } else {
            Err(format!(
                "expected `{close}` to end the {ty}, got {}",
                self.got()
            ))
        }
    }

    /// Items of a bracketed sequence, after the opening bracket, up to and including `close`.
    fn sequence(
        &mut self,
        close: char,
        ty: &Type,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.eat(close) {
            return Ok(());
        }
        let mut index = 0;
        loop {
            item(self, index)?;
            index += 1;
            if self.eat(',') {
                continue;
            }
            return self.close(close, ty);
        }
    }

    fn value(&mut self, ty: &Type, depth: usize) -> Result<Value, String> {
        if depth > VALUE_DEPTH_MAX {
            return Err(format!("value nests deeper than {VALUE_DEPTH_MAX} levels"));
        }
        let start = self.position;
        if let Some((min, max)) = int_range(ty) {
            let word = self.bare(ty)?;
            return match word.parse::<i128>() {
                Ok(int) if (min..=max).contains(&int) => Ok(if is_signed(ty) {
                    Value::Int(int as i64)
                } else {
                    Value::Uint(int as u64)
                }),
                _ => {
                    self.position = start;
                    Err(format!("expected {ty}{}, got `{word}`", hint(ty)))
                }
            };
        }
        match ty {
            Type::Bool => match self.bare(ty)? {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                word => Err(format!("expected bool (true or false), got `{word}`")),
            },
            Type::F32 | Type::F64 => {
                let word = self.bare(ty)?;
                word.parse::<f64>()
                    .map(Value::Float)
                    .map_err(|_| format!("expected {ty}{}, got `{word}`", hint(ty)))
            }
            Type::Char => {
                let atom = self.atom()?;
                let mut chars = atom.text().chars();
                match (chars.next(), chars.next()) {
                    (Some(char), None) => Ok(Value::Char(char)),
                    _ => Err(format!(
                        "expected char (one character), got `{}`",
                        atom.text()
                    )),
                }
            }
            Type::String => match self.atom()? {
                Atom::Quoted(text) => Ok(Value::String(text)),
                Atom::Bare(word) if !word.is_empty() => Ok(Value::String(word.to_string())),
                Atom::Bare(_) => Err(self.expected(ty)),
            },
            Type::Decimal => {
                let atom = self.atom()?;
                decimal(atom.text())
            }
            Type::Option(inner) => {
                if let Ok(Atom::Bare("null" | "none")) = self.atom() {
                    return Ok(Value::Option(None));
                }
                self.position = start;
                Ok(Value::Option(Some(Box::new(self.value(inner, depth + 1)?))))
            }
            Type::List(item) => {
                if !self.eat('[') {
                    return Err(self.expected(ty));
                }
                let mut items = Vec::new();
                self.sequence(']', ty, |parser, _| {
                    items.push(parser.value(item, depth + 1)?);
                    Ok(())
                })?;
                Ok(Value::List(items))
            }
            Type::Tuple(types) => {
                let close = if self.eat('[') {
                    ']'
                } else if self.eat('(') {
                    ')'
                } else {
                    return Err(self.expected(ty));
                };
                let mut items = Vec::with_capacity(types.len());
                self.sequence(close, ty, |parser, index| {
                    let Some(item) = types.get(index) else {
                        return Err(format!("{ty} has {} items, got more", types.len()));
                    };
                    items.push(parser.value(item, depth + 1)?);
                    Ok(())
                })?;
                if items.len() != types.len() {
                    return Err(format!(
                        "{ty} has {} items, got {}",
                        types.len(),
                        items.len()
                    ));
                }
                Ok(Value::Tuple(items))
            }
            Type::Record(fields) => {
                if !self.eat('{') {
                    return Err(self.expected(ty));
                }
                let mut values: Vec<Option<Value>> = vec![None; fields.len()];
                self.sequence('}', ty, |parser, _| {
                    let name = parser.atom()?;
                    let name = name.text();
                    let Some(index) = fields.iter().position(|(field, _)| field == name) else {
                        let names: Vec<&str> = fields.iter().map(|(f, _)| f.as_str()).collect();
                        return Err(format!(
                            "record has no field `{name}` (fields: {})",
                            names.join(", ")
                        ));
                    };
                    if !parser.eat(':') {
                        return Err(format!("expected `:` after field `{name}`"));
                    }
                    if values[index].is_some() {
                        return Err(format!("field `{name}` is given twice"));
                    }
                    values[index] = Some(parser.value(&fields[index].1, depth + 1)?);
                    Ok(())
                })?;
                let mut record = Vec::with_capacity(fields.len());
                for ((name, _), value) in fields.iter().zip(values) {
                    match value {
                        Some(value) => record.push((name.clone(), value)),
                        None => return Err(format!("field `{name}` is missing")),
                    }
                }
                Ok(Value::Record(record))
            }
            Type::Enum(cases) => {
                let atom = self.atom()?;
                let case = atom.text();
                if cases.iter().any(|known| known == case) {
                    Ok(Value::Enum(case.to_string()))
                } else {
                    Err(format!("expected {ty}{}, got `{case}`", hint(ty)))
                }
            }
            Type::Variant(cases) => {
                let atom = self.atom()?;
                let case = atom.text().to_string();
                let Some((_, payload)) = cases.iter().find(|(known, _)| *known == case) else {
                    return Err(format!("expected {ty}{}, got `{case}`", hint(ty)));
                };
                let payload = self.payload(payload.as_ref(), &case, depth)?;
                Ok(Value::Variant(case, payload))
            }
            Type::Result { ok, err } => {
                let word = self.bare(ty)?;
                match word {
                    "ok" => Ok(Value::Result(Ok(self.payload(
                        ok.as_deref(),
                        word,
                        depth,
                    )?))),
                    "err" | "error" => Ok(Value::Result(Err(self.payload(
                        err.as_deref(),
                        word,
                        depth,
                    )?))),
                    _ => Err(format!("expected {ty}{}, got `{word}`", hint(ty))),
                }
            }
            Type::Flags(names) => {
                if !self.eat('[') {
                    return Err(self.expected(ty));
                }
                let mut set = Vec::new();
                self.sequence(']', ty, |parser, _| {
                    let atom = parser.atom()?;
                    let name = atom.text();
                    if !names.iter().any(|known| known == name) {
                        return Err(format!("expected {ty}{}, got `{name}`", hint(ty)));
                    }
                    if !set.iter().any(|seen: &String| seen == name) {
                        set.push(name.to_string());
                    }
                    Ok(())
                })?;
                Ok(Value::Flags(set))
            }
            _ => unreachable!("integer types are handled above"),
        }
    }

    /// The `(value)` after a variant case or result arm, if its type has one.
    fn payload(
        &mut self,
        ty: Option<&Type>,
        case: &str,
        depth: usize,
    ) -> Result<Option<Box<Value>>, String> {
        match ty {
            None => Ok(None),
            Some(ty) => {
                if !self.eat('(') {
                    return Err(format!("`{case}` carries a {ty}: write {case}(…)"));
                }
                let value = self.value(ty, depth + 1)?;
                if !self.eat(')') {
                    return Err(format!(
                        "expected `)` after the {case} value, got {}",
                        self.got()
                    ));
                }
                Ok(Some(Box::new(value)))
            }
        }
    }
}

fn decimal(text: &str) -> Result<Value, String> {
    match Decimal::parse(text) {
        Ok(value) => Ok(Value::Decimal(value)),
        Err(error) if error.is_malformed() => {
            Err(format!("expected decimal (e.g. 1000 or 0.5), got `{text}`"))
        }
        Err(error) => Err(format!("expected decimal: {error}")),
    }
}

impl Value {
    /// Parses one CLI argument against the parameter type. Errors name the expected type:
    /// "expected decimal (e.g. 1000 or 0.5), got `abc`". Integers are range-checked to the
    /// type's width; bool is `true`/`false`; a string (or char) argument is taken verbatim;
    /// an option is `null`/`none` or the inner value; lists and tuples are `[1, 2]`, records
    /// `{a: 1, b: "x"}` (strings inside them quoted, or bare words), enums and flags by case
    /// name, variants and results as `case` or `case(value)`.
    pub fn parse(text: &str, ty: &Type) -> Result<Value, String> {
        match ty {
            Type::String => return Ok(Value::String(text.to_string())),
            Type::Char => {
                let mut chars = text.chars();
                return match (chars.next(), chars.next()) {
                    (Some(char), None) => Ok(Value::Char(char)),
                    _ => Err(format!("expected char (one character), got `{text}`")),
                };
            }
            Type::Option(inner) if matches!(**inner, Type::String | Type::Char) => {
                return match text.trim() {
                    "null" | "none" => Ok(Value::Option(None)),
                    _ => Ok(Value::Option(Some(Box::new(Value::parse(text, inner)?)))),
                };
            }
            Type::Decimal => return decimal(text.trim()),
            _ => {}
        }
        let mut parser = Parser { text, position: 0 };
        let value = parser.value(ty, 1)?;
        parser.skip_whitespace();
        if !parser.rest().is_empty() {
            return Err(format!("unexpected {} after the {ty} value", parser.got()));
        }
        Ok(value)
    }

    /// Whether the value fits the type; the error names the type and what was found, e.g.
    /// "expected u64, got string \"abc\"".
    pub fn check(&self, ty: &Type) -> Result<(), String> {
        self.check_at(ty, 1)
    }

    /// A short name of the value's kind, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Bool(_) => "bool",
            Value::Int(_) => "signed integer",
            Value::Uint(_) => "unsigned integer",
            Value::Float(_) => "float",
            Value::Char(_) => "char",
            Value::String(_) => "string",
            Value::Decimal(_) => "decimal",
            Value::List(_) => "list",
            Value::Option(_) => "option",
            Value::Result(_) => "result",
            Value::Tuple(_) => "tuple",
            Value::Record(_) => "record",
            Value::Enum(_) => "enum",
            Value::Variant(..) => "variant",
            Value::Flags(_) => "flags",
        }
    }

    fn mismatch(&self, ty: &Type) -> String {
        let mut shown = self.to_string();
        if shown.len() > 60 {
            let cut = (0..=60)
                .rev()
                .find(|index| shown.is_char_boundary(*index))
                .unwrap_or(0);
            shown.truncate(cut);
            shown.push('…');
        }
        format!("expected {ty}, got {} {shown}", self.kind_name())
    }

    fn check_at(&self, ty: &Type, depth: usize) -> Result<(), String> {
        if depth > VALUE_DEPTH_MAX {
            return Err(format!("value nests deeper than {VALUE_DEPTH_MAX} levels"));
        }
        if let Some((min, max)) = int_range(ty) {
            let int = match (self, is_signed(ty)) {
                (Value::Int(int), true) => i128::from(*int),
                (Value::Uint(uint), false) => i128::from(*uint),
                _ => return Err(self.mismatch(ty)),
            };
            if !(min..=max).contains(&int) {
                return Err(format!("expected {ty}{}, got {int}", hint(ty)));
            }
            return Ok(());
        }
        let fits = match (ty, self) {
            (Type::Bool, Value::Bool(_))
            | (Type::F32 | Type::F64, Value::Float(_))
            | (Type::Char, Value::Char(_))
            | (Type::String, Value::String(_))
            | (Type::Decimal, Value::Decimal(_))
            | (Type::Option(_), Value::Option(None)) => true,
            (Type::Option(inner), Value::Option(Some(value))) => {
                return value.check_at(inner, depth + 1);
            }
            (Type::List(item), Value::List(items)) => {
                for value in items {
                    value.check_at(item, depth + 1)?;
                }
                true
            }
            (Type::Result { ok, err }, Value::Result(result)) => {
                let (arm, ty, value) = match result {
                    Ok(value) => ("ok", ok, value),
                    Err(value) => ("err", err, value),
                };
                return match (ty, value) {
                    (None, None) => Ok(()),
                    (Some(ty), Some(value)) => value.check_at(ty, depth + 1),
                    (None, Some(_)) => Err(format!("{arm} of {} carries no value", self)),
                    (Some(ty), None) => Err(format!("{arm} must carry a {ty}")),
                };
            }
            (Type::Tuple(types), Value::Tuple(items)) => {
                if types.len() != items.len() {
                    return Err(format!(
                        "{ty} has {} items, got {}",
                        types.len(),
                        items.len()
                    ));
                }
                for (value, ty) in items.iter().zip(types) {
                    value.check_at(ty, depth + 1)?;
                }
                true
            }
            (Type::Record(fields), Value::Record(values)) => {
                if fields.len() != values.len() {
                    return Err(format!(
                        "{ty} has {} fields, got {}",
                        fields.len(),
                        values.len()
                    ));
                }
                for ((name, ty), (given, value)) in fields.iter().zip(values) {
                    if name != given {
                        return Err(format!("expected field `{name}`, got `{given}`"));
                    }
                    value
                        .check_at(ty, depth + 1)
                        .map_err(|message| format!("field `{name}`: {message}"))?;
                }
                true
            }
            (Type::Enum(cases), Value::Enum(case)) => cases.contains(case),
            (Type::Variant(cases), Value::Variant(case, payload)) => {
                let Some((_, ty)) = cases.iter().find(|(known, _)| known == case) else {
                    return Err(self.mismatch(ty));
                };
                return match (ty, payload) {
                    (None, None) => Ok(()),
                    (Some(ty), Some(value)) => value.check_at(ty, depth + 1),
                    (None, Some(_)) => Err(format!("case `{case}` carries no value")),
                    (Some(ty), None) => Err(format!("case `{case}` must carry a {ty}")),
                };
            }
            (Type::Flags(names), Value::Flags(set)) => {
                set.iter().all(|flag| names.contains(flag))
                    && set
                        .iter()
                        .enumerate()
                        .all(|(index, flag)| !set[..index].contains(flag))
            }
            _ => false,
        };
        if fits {
            Ok(())
        } else {
            Err(self.mismatch(ty))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Binary encoding (see docs/protocol.md, "Types" and "Values")

mod tag {
    pub const TYPE_BOOL: u8 = 0x01;
    pub const TYPE_S8: u8 = 0x02;
    pub const TYPE_S16: u8 = 0x03;
    pub const TYPE_S32: u8 = 0x04;
    pub const TYPE_S64: u8 = 0x05;
    pub const TYPE_U8: u8 = 0x06;
    pub const TYPE_U16: u8 = 0x07;
    pub const TYPE_U32: u8 = 0x08;
    pub const TYPE_U64: u8 = 0x09;
    pub const TYPE_F32: u8 = 0x0a;
    pub const TYPE_F64: u8 = 0x0b;
    pub const TYPE_CHAR: u8 = 0x0c;
    pub const TYPE_STRING: u8 = 0x0d;
    pub const TYPE_DECIMAL: u8 = 0x0e;
    pub const TYPE_LIST: u8 = 0x10;
    pub const TYPE_OPTION: u8 = 0x11;
    pub const TYPE_RESULT: u8 = 0x12;
    pub const TYPE_TUPLE: u8 = 0x13;
    pub const TYPE_RECORD: u8 = 0x14;
    pub const TYPE_ENUM: u8 = 0x15;
    pub const TYPE_VARIANT: u8 = 0x16;
    pub const TYPE_FLAGS: u8 = 0x17;

    pub const BOOL: u8 = 0x01;
    pub const INT: u8 = 0x02;
    pub const UINT: u8 = 0x03;
    pub const FLOAT: u8 = 0x04;
    pub const CHAR: u8 = 0x05;
    pub const STRING: u8 = 0x06;
    pub const DECIMAL: u8 = 0x07;
    pub const LIST: u8 = 0x08;
    pub const OPTION: u8 = 0x09;
    pub const RESULT: u8 = 0x0a;
    pub const TUPLE: u8 = 0x0b;
    pub const RECORD: u8 = 0x0c;
    pub const ENUM: u8 = 0x0d;
    pub const VARIANT: u8 = 0x0e;
    pub const FLAGS: u8 = 0x0f;

    /// Result arms: bit 0 set = err, bit 1 set = carries a value.
    pub const RESULT_OK: u8 = 0;
    pub const RESULT_ERR: u8 = 1;
    pub const RESULT_PAYLOAD: u8 = 2;
}

pub(crate) fn encode_type(ty: &Type, out: &mut Writer) {
    match ty {
        Type::Bool => out.u8(tag::TYPE_BOOL),
        Type::S8 => out.u8(tag::TYPE_S8),
        Type::S16 => out.u8(tag::TYPE_S16),
        Type::S32 => out.u8(tag::TYPE_S32),
        Type::S64 => out.u8(tag::TYPE_S64),
        Type::U8 => out.u8(tag::TYPE_U8),
        Type::U16 => out.u8(tag::TYPE_U16),
        Type::U32 => out.u8(tag::TYPE_U32),
        Type::U64 => out.u8(tag::TYPE_U64),
        Type::F32 => out.u8(tag::TYPE_F32),
        Type::F64 => out.u8(tag::TYPE_F64),
        Type::Char => out.u8(tag::TYPE_CHAR),
        Type::String => out.u8(tag::TYPE_STRING),
        Type::Decimal => out.u8(tag::TYPE_DECIMAL),
        Type::List(item) => {
            out.u8(tag::TYPE_LIST);
            encode_type(item, out);
        }
        Type::Option(inner) => {
            out.u8(tag::TYPE_OPTION);
            encode_type(inner, out);
        }
        Type::Result { ok, err } => {
            out.u8(tag::TYPE_RESULT);
            out.u8(u8::from(ok.is_some()) | u8::from(err.is_some()) << 1);
            if let Some(ok) = ok {
                encode_type(ok, out);
            }
            if let Some(err) = err {
                encode_type(err, out);
            }
        }
        Type::Tuple(items) => {
            out.u8(tag::TYPE_TUPLE);
            out.len(items.len());
            for item in items {
                encode_type(item, out);
            }
        }
        Type::Record(fields) => {
            out.u8(tag::TYPE_RECORD);
            out.len(fields.len());
            for (name, ty) in fields {
                out.str(name);
                encode_type(ty, out);
            }
        }
        Type::Enum(names) | Type::Flags(names) => {
            out.u8(if matches!(ty, Type::Enum(_)) {
                tag::TYPE_ENUM
            } else {
                tag::TYPE_FLAGS
            });
            out.len(names.len());
            for name in names {
                out.str(name);
            }
        }
        Type::Variant(cases) => {
            out.u8(tag::TYPE_VARIANT);
            out.len(cases.len());
            for (name, payload) in cases {
                out.str(name);
                out.bool(payload.is_some());
                if let Some(payload) = payload {
                    encode_type(payload, out);
                }
            }
        }
    }
}

fn check_depth(depth: usize) -> Result<(), Error> {
    if depth > VALUE_DEPTH_MAX {
        return Err(Error::TooDeep {
            max: VALUE_DEPTH_MAX,
        });
    }
    Ok(())
}

fn decode_names(input: &mut Reader<'_>) -> Result<Vec<String>, Error> {
    let count = input.count(4)?;
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        names.push(input.str()?.to_string());
    }
    Ok(names)
}

pub(crate) fn decode_type(input: &mut Reader<'_>, depth: usize) -> Result<Type, Error> {
    check_depth(depth)?;
    let tag = input.u8()?;
    Ok(match tag {
        tag::TYPE_BOOL => Type::Bool,
        tag::TYPE_S8 => Type::S8,
        tag::TYPE_S16 => Type::S16,
        tag::TYPE_S32 => Type::S32,
        tag::TYPE_S64 => Type::S64,
        tag::TYPE_U8 => Type::U8,
        tag::TYPE_U16 => Type::U16,
        tag::TYPE_U32 => Type::U32,
        tag::TYPE_U64 => Type::U64,
        tag::TYPE_F32 => Type::F32,
        tag::TYPE_F64 => Type::F64,
        tag::TYPE_CHAR => Type::Char,
        tag::TYPE_STRING => Type::String,
        tag::TYPE_DECIMAL => Type::Decimal,
        tag::TYPE_LIST => Type::List(Box::new(decode_type(input, depth + 1)?)),
        tag::TYPE_OPTION => Type::Option(Box::new(decode_type(input, depth + 1)?)),
        tag::TYPE_RESULT => {
            let arms = input.u8()?;
            if arms > 3 {
                return Err(Error::BadTag {
                    what: "result type arms",
                    tag: arms,
                });
            }
            let ok = match arms & 1 {
                1 => Some(Box::new(decode_type(input, depth + 1)?)),
                _ => None,
            };
            let err = match arms & 2 {
                2 => Some(Box::new(decode_type(input, depth + 1)?)),
                _ => None,
            };
            Type::Result { ok, err }
        }
        tag::TYPE_TUPLE => {
            let count = input.count(1)?;
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                items.push(decode_type(input, depth + 1)?);
            }
            Type::Tuple(items)
        }
        tag::TYPE_RECORD => {
            let count = input.count(5)?;
            let mut fields = Vec::with_capacity(count);
            for _ in 0..count {
                let name = input.str()?.to_string();
                fields.push((name, decode_type(input, depth + 1)?));
            }
            Type::Record(fields)
        }
        tag::TYPE_ENUM => Type::Enum(decode_names(input)?),
        tag::TYPE_FLAGS => Type::Flags(decode_names(input)?),
        tag::TYPE_VARIANT => {
            let count = input.count(5)?;
            let mut cases = Vec::with_capacity(count);
            for _ in 0..count {
                let name = input.str()?.to_string();
                let payload = match input.bool("variant type payload")? {
                    true => Some(decode_type(input, depth + 1)?),
                    false => None,
                };
                cases.push((name, payload));
            }
            Type::Variant(cases)
        }
        tag => return Err(Error::BadTag { what: "type", tag }),
    })
}

fn encode_values(items: &[Value], out: &mut Writer) {
    out.len(items.len());
    for item in items {
        encode_value(item, out);
    }
}

fn encode_payload(payload: &Option<Box<Value>>, out: &mut Writer) {
    out.bool(payload.is_some());
    if let Some(payload) = payload {
        encode_value(payload, out);
    }
}

pub(crate) fn encode_value(value: &Value, out: &mut Writer) {
    match value {
        Value::Bool(value) => {
            out.u8(tag::BOOL);
            out.bool(*value);
        }
        Value::Int(value) => {
            out.u8(tag::INT);
            out.i64(*value);
        }
        Value::Uint(value) => {
            out.u8(tag::UINT);
            out.u64(*value);
        }
        Value::Float(value) => {
            out.u8(tag::FLOAT);
            out.u64(value.to_bits());
        }
        Value::Char(value) => {
            out.u8(tag::CHAR);
            out.u32(u32::from(*value));
        }
        Value::String(value) => {
            out.u8(tag::STRING);
            out.str(value);
        }
        Value::Decimal(value) => {
            out.u8(tag::DECIMAL);
            out.i64(value.micros());
        }
        Value::List(items) => {
            out.u8(tag::LIST);
            encode_values(items, out);
        }
        Value::Option(inner) => {
            out.u8(tag::OPTION);
            encode_payload(inner, out);
        }
        Value::Result(result) => {
            out.u8(tag::RESULT);
            let (arm, payload) = match result {
                Ok(payload) => (tag::RESULT_OK, payload),
                Err(payload) => (tag::RESULT_ERR, payload),
            };
            let carries = if payload.is_some() {
                tag::RESULT_PAYLOAD
            } else {
                0
            };
            out.u8(arm | carries);
            if let Some(payload) = payload {
                encode_value(payload, out);
            }
        }
        Value::Tuple(items) => {
            out.u8(tag::TUPLE);
            encode_values(items, out);
        }
        Value::Record(fields) => {
            out.u8(tag::RECORD);
            out.len(fields.len());
            for (name, value) in fields {
                out.str(name);
                encode_value(value, out);
            }
        }
        Value::Enum(case) => {
            out.u8(tag::ENUM);
            out.str(case);
        }
        Value::Variant(case, payload) => {
            out.u8(tag::VARIANT);
            out.str(case);
            encode_payload(payload, out);
        }
        Value::Flags(names) => {
            out.u8(tag::FLAGS);
            out.len(names.len());
            for name in names {
                out.str(name);
            }
        }
    }
}

fn decode_values(input: &mut Reader<'_>, depth: usize) -> Result<Vec<Value>, Error> {
    // Every value is at least two bytes (tag and a one-byte body).
    let count = input.count(2)?;
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        items.push(decode_value(input, depth + 1)?);
    }
    Ok(items)
}

fn decode_payload(
    input: &mut Reader<'_>,
    what: &'static str,
    depth: usize,
) -> Result<Option<Box<Value>>, Error> {
    Ok(match input.bool(what)? {
        true => Some(Box::new(decode_value(input, depth + 1)?)),
        false => None,
    })
}

pub(crate) fn decode_value(input: &mut Reader<'_>, depth: usize) -> Result<Value, Error> {
    check_depth(depth)?;
    let tag = input.u8()?;
    Ok(match tag {
        tag::BOOL => Value::Bool(input.bool("bool value")?),
        tag::INT => Value::Int(input.i64()?),
        tag::UINT => Value::Uint(input.u64()?),
        tag::FLOAT => Value::Float(f64::from_bits(input.u64()?)),
        tag::CHAR => {
            let scalar = input.u32()?;
            Value::Char(char::from_u32(scalar).ok_or(Error::BadChar(scalar))?)
        }
        tag::STRING => Value::String(input.str()?.to_string()),
        tag::DECIMAL => Value::Decimal(Decimal::from_micros(input.i64()?)),
        tag::LIST => Value::List(decode_values(input, depth)?),
        tag::OPTION => Value::Option(decode_payload(input, "option presence", depth)?),
        tag::RESULT => {
            let arm = input.u8()?;
            if arm > (tag::RESULT_ERR | tag::RESULT_PAYLOAD) {
                return Err(Error::BadTag {
                    what: "result arm",
                    tag: arm,
                });
            }
            let payload = match arm & tag::RESULT_PAYLOAD {
                0 => None,
                _ => Some(Box::new(decode_value(input, depth + 1)?)),
            };
            match arm & tag::RESULT_ERR {
                0 => Value::Result(Ok(payload)),
                _ => Value::Result(Err(payload)),
            }
        }
        tag::TUPLE => Value::Tuple(decode_values(input, depth)?),
        tag::RECORD => {
            let count = input.count(6)?;
            let mut fields = Vec::with_capacity(count);
            for _ in 0..count {
                let name = input.str()?.to_string();
                fields.push((name, decode_value(input, depth + 1)?));
            }
            Value::Record(fields)
        }
        tag::ENUM => Value::Enum(input.str()?.to_string()),
        tag::VARIANT => {
            let case = input.str()?.to_string();
            Value::Variant(
                case,
                decode_payload(input, "variant payload presence", depth)?,
            )
        }
        tag::FLAGS => Value::Flags(decode_names(input)?),
        tag => return Err(Error::BadTag { what: "value", tag }),
    })
}

impl Value {
    /// The value in the binary form of `docs/protocol.md`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Writer::default();
        encode_value(self, &mut out);
        out.out
    }

    /// Decodes exactly one value from `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Value, Error> {
        let mut input = Reader::new(bytes);
        let value = decode_value(&mut input, 1)?;
        input.finish()?;
        Ok(value)
    }
}

impl Type {
    /// The type in the binary form of `docs/protocol.md`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Writer::default();
        encode_type(self, &mut out);
        out.out
    }

    /// Decodes exactly one type from `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Type, Error> {
        let mut input = Reader::new(bytes);
        let ty = decode_type(&mut input, 1)?;
        input.finish()?;
        Ok(ty)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn dec(text: &str) -> Decimal {
        Decimal::parse(text).unwrap()
    }

    fn account_type() -> Type {
        Type::Record(vec![
            ("id".into(), Type::U64),
            ("balance".into(), Type::Decimal),
            ("velocity".into(), Type::Decimal),
        ])
    }

    /// One value of every variant, with the type it has.
    pub(crate) fn samples() -> Vec<(Value, Type)> {
        vec![
            (Value::Bool(true), Type::Bool),
            (Value::Int(-5), Type::S8),
            (Value::Int(i64::MIN), Type::S64),
            (Value::Uint(u64::MAX), Type::U64),
            (Value::Uint(7), Type::U16),
            (Value::Float(1.5), Type::F64),
            (Value::Float(-0.25), Type::F32),
            (Value::Char('ж'), Type::Char),
            (Value::String("hé \"x\"".into()), Type::String),
            (Value::Decimal(dec("-2.25")), Type::Decimal),
            (
                Value::List(vec![Value::Uint(1), Value::Uint(2)]),
                Type::List(Box::new(Type::U8)),
            ),
            (Value::List(vec![]), Type::List(Box::new(Type::String))),
            (Value::Option(None), Type::Option(Box::new(Type::U64))),
            (
                Value::Option(Some(Box::new(Value::String("x".into())))),
                Type::Option(Box::new(Type::String)),
            ),
            (
                Value::Result(Ok(Some(Box::new(Value::Bool(true))))),
                Type::Result {
                    ok: Some(Box::new(Type::Bool)),
                    err: Some(Box::new(Type::String)),
                },
            ),
            (
                Value::Result(Err(Some(Box::new(Value::String("no".into()))))),
                Type::Result {
                    ok: Some(Box::new(Type::Bool)),
                    err: Some(Box::new(Type::String)),
                },
            ),
            (
                Value::Result(Ok(None)),
                Type::Result {
                    ok: None,
                    err: None,
                },
            ),
            (
                Value::Result(Err(None)),
                Type::Result {
                    ok: Some(Box::new(Type::U8)),
                    err: None,
                },
            ),
            (
                Value::Tuple(vec![Value::Uint(4), Value::Decimal(dec("1000"))]),
                Type::Tuple(vec![Type::U64, Type::Decimal]),
            ),
            (
                Value::Record(vec![
                    ("id".into(), Value::Uint(4)),
                    ("balance".into(), Value::Decimal(dec("1.5"))),
                    ("velocity".into(), Value::Decimal(dec("0.00001"))),
                ]),
                account_type(),
            ),
            (
                Value::Enum("active".into()),
                Type::Enum(vec!["active".into(), "sent".into()]),
            ),
            (
                Value::Variant("moved".into(), Some(Box::new(Value::Uint(3)))),
                Type::Variant(vec![
                    ("moved".into(), Some(Type::U32)),
                    ("gone".into(), None),
                ]),
            ),
            (
                Value::Variant("gone".into(), None),
                Type::Variant(vec![
                    ("moved".into(), Some(Type::U32)),
                    ("gone".into(), None),
                ]),
            ),
            (
                Value::Flags(vec!["read".into(), "write".into()]),
                Type::Flags(vec!["read".into(), "write".into(), "admin".into()]),
            ),
        ]
    }

    #[test]
    fn every_value_and_type_round_trips_and_checks() {
        for (value, ty) in samples() {
            assert_eq!(Value::decode(&value.encode()).unwrap(), value);
            assert_eq!(Type::decode(&ty.encode()).unwrap(), ty);
            value
                .check(&ty)
                .unwrap_or_else(|e| panic!("{value:?} against {ty}: {e}"));
        }
    }

    #[test]
    fn display_of_types_is_wit() {
        assert_eq!(Type::List(Box::new(Type::U8)).to_string(), "list<u8>");
        assert_eq!(
            Type::Option(Box::new(Type::String)).to_string(),
            "option<string>"
        );
        let result = Type::Result {
            ok: Some(Box::new(Type::Bool)),
            err: Some(Box::new(Type::String)),
        };
        assert_eq!(result.to_string(), "result<bool, string>");
        assert_eq!(
            Type::Result {
                ok: None,
                err: Some(Box::new(Type::U8))
            }
            .to_string(),
            "result<_, u8>"
        );
        assert_eq!(
            Type::Tuple(vec![Type::U64, Type::Decimal]).to_string(),
            "tuple<u64, decimal>"
        );
        assert_eq!(
            account_type().to_string(),
            "record { id: u64, balance: decimal, velocity: decimal }"
        );
        let variant = Type::Variant(vec![("a".into(), Some(Type::U32)), ("b".into(), None)]);
        assert_eq!(variant.to_string(), "variant { a(u32), b }");
    }

    #[test]
    fn display_of_values_is_console_like() {
        let shown: Vec<String> = samples()
            .iter()
            .map(|(value, _)| value.to_string())
            .collect();
        let expected = [
            "true",
            "-5",
            "-9223372036854775808",
            "18446744073709551615",
            "7",
            "1.5",
            "-0.25",
            "\"ж\"",
            "\"hé \\\"x\\\"\"",
            "-2.25",
            "[1, 2]",
            "[]",
            "null",
            "\"x\"",
            "true",
            "error(\"no\")",
            "ok",
            "error",
            "[4, 1000]",
            "{id: 4, balance: 1.5, velocity: 0.00001}",
            "active",
            "moved(3)",
            "gone",
            "[read, write]",
        ];
        assert_eq!(shown, expected);
    }

    #[test]
    fn parse_cli_arguments() {
        let ok = |text: &str, ty: &Type| {
            Value::parse(text, ty).unwrap_or_else(|e| panic!("{text} as {ty}: {e}"))
        };
        assert_eq!(ok("4", &Type::U64), Value::Uint(4));
        assert_eq!(ok("-4", &Type::S32), Value::Int(-4));
        assert_eq!(ok("1000", &Type::Decimal), Value::Decimal(dec("1000")));
        assert_eq!(
            ok("0.00001", &Type::Decimal),
            Value::Decimal(dec("0.00001"))
        );
        assert_eq!(ok("true", &Type::Bool), Value::Bool(true));
        assert_eq!(ok("2.5", &Type::F64), Value::Float(2.5));
        assert_eq!(ok("a b, c", &Type::String), Value::String("a b, c".into()));
        assert_eq!(ok("ж", &Type::Char), Value::Char('ж'));
        assert_eq!(
            ok("null", &Type::Option(Box::new(Type::U64))),
            Value::Option(None)
        );
        assert_eq!(
            ok("none", &Type::Option(Box::new(Type::String))),
            Value::Option(None)
        );
        assert_eq!(
            ok("hi there", &Type::Option(Box::new(Type::String))),
            Value::Option(Some(Box::new(Value::String("hi there".into()))))
        );
        assert_eq!(
            ok("5", &Type::Option(Box::new(Type::U8))),
            Value::Option(Some(Box::new(Value::Uint(5))))
        );
        assert_eq!(
            ok(" [1, 2 ,3] ", &Type::List(Box::new(Type::U8))),
            Value::List(vec![Value::Uint(1), Value::Uint(2), Value::Uint(3)])
        );
        assert_eq!(
            ok("[]", &Type::List(Box::new(Type::U8))),
            Value::List(vec![])
        );
        assert_eq!(
            ok("(4, 1.5)", &Type::Tuple(vec![Type::U64, Type::Decimal])),
            Value::Tuple(vec![Value::Uint(4), Value::Decimal(dec("1.5"))])
        );
        let record = ok("{velocity: 0.5, \"id\": 4, balance: 10}", &account_type());
        assert_eq!(
            record,
            Value::Record(vec![
                ("id".into(), Value::Uint(4)),
                ("balance".into(), Value::Decimal(dec("10"))),
                ("velocity".into(), Value::Decimal(dec("0.5"))),
            ])
        );
        let names = Type::List(Box::new(Type::String));
        assert_eq!(
            ok(r#"["a, b", 'c\'d', bare]"#, &names),
            Value::List(vec![
                Value::String("a, b".into()),
                Value::String("c'd".into()),
                Value::String("bare".into()),
            ])
        );
        // Every sample's display parses back (top-level strings are verbatim, so skip those).
        for (value, ty) in samples() {
            if matches!(ty, Type::String | Type::Char | Type::Result { .. }) {
                continue;
            }
            if matches!(&ty, Type::Option(inner) if **inner == Type::String) {
                continue;
            }
            assert_eq!(ok(&value.to_string(), &ty), value, "{value}");
        }
        let result = Type::Result {
            ok: Some(Box::new(Type::Bool)),
            err: Some(Box::new(Type::String)),
        };
        assert_eq!(
            ok("ok(true)", &result),
            Value::Result(Ok(Some(Box::new(Value::Bool(true)))))
        );
        assert_eq!(
            ok("err(\"x\")", &result),
            Value::Result(Err(Some(Box::new(Value::String("x".into())))))
        );
    }

    #[test]
    fn parse_errors_name_the_type() {
        let err = |text: &str, ty: &Type| Value::parse(text, ty).expect_err(text);
        assert_eq!(
            err("abc", &Type::Decimal),
            "expected decimal (e.g. 1000 or 0.5), got `abc`"
        );
        assert!(err("0.0000001", &Type::Decimal).contains("more than 6 fractional digits"));
        assert_eq!(
            err("256", &Type::U8),
            "expected u8 (a whole number from 0 to 255), got `256`"
        );
        assert_eq!(
            err("-1", &Type::U64),
            "expected u64 (a whole number from 0 to 18446744073709551615), got `-1`"
        );
        assert!(err("-129", &Type::S8).contains("from -128 to 127"));
        assert!(err("yes", &Type::Bool).contains("expected bool (true or false)"));
        assert!(err("ab", &Type::Char).contains("one character"));
        assert!(err("[1, 2", &Type::List(Box::new(Type::U8))).contains("`]`"));
        assert!(err("[1, x]", &Type::List(Box::new(Type::U8))).contains("got `x`"));
        assert!(err("1 2", &Type::U8).contains("unexpected `2`"));
        assert!(err("{id: 4}", &account_type()).contains("field `balance` is missing"));
        assert!(err("{id: 4, nope: 1}", &account_type()).contains("no field `nope`"));
        assert!(err("[1]", &Type::Tuple(vec![Type::U8, Type::U8])).contains("has 2 items, got 1"));
        assert!(err("[1, 2, 3]", &Type::Tuple(vec![Type::U8, Type::U8])).contains("got more"));
        assert!(err("x", &Type::Enum(vec!["a".into()])).contains("one of a"));
        let deep = "[".repeat(100);
        let mut ty = Type::U8;
        for _ in 0..100 {
            ty = Type::List(Box::new(ty));
        }
        assert!(err(&deep, &ty).contains("deeper"));
    }

    #[test]
    fn check_rejects_wrong_types() {
        assert_eq!(
            Value::String("abc".into()).check(&Type::U64).unwrap_err(),
            "expected u64, got string \"abc\""
        );
        assert!(
            Value::Int(4).check(&Type::U64).is_err(),
            "signed value for unsigned type"
        );
        assert!(Value::Uint(300)
            .check(&Type::U8)
            .unwrap_err()
            .contains("from 0 to 255"));
        assert!(Value::Int(-200).check(&Type::S8).is_err());
        assert!(Value::Enum("x".into())
            .check(&Type::Enum(vec!["a".into()]))
            .is_err());
        let flags = Type::Flags(vec!["a".into()]);
        assert!(Value::Flags(vec!["a".into(), "a".into()])
            .check(&flags)
            .is_err());
        let record = Value::Record(vec![("id".into(), Value::String("x".into()))]);
        let ty = Type::Record(vec![("id".into(), Type::U64)]);
        assert!(record.check(&ty).unwrap_err().starts_with("field `id`"));
        let unit = Type::Result {
            ok: None,
            err: None,
        };
        assert!(Value::Result(Ok(Some(Box::new(Value::Bool(true)))))
            .check(&unit)
            .is_err());
    }

    #[test]
    fn decoding_limits() {
        // Nesting beyond the limit is refused, not recursed into.
        let mut bytes = [tag::OPTION, 1].repeat(VALUE_DEPTH_MAX + 5);
        bytes.extend([tag::BOOL, 1]);
        assert_eq!(
            Value::decode(&bytes),
            Err(Error::TooDeep {
                max: VALUE_DEPTH_MAX
            })
        );
        // A huge count with no items behind it fails before allocating.
        let huge = [tag::LIST, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(Value::decode(&huge), Err(Error::Truncated));
        assert_eq!(
            Value::decode(&[tag::CHAR, 0x00, 0xd8, 0, 0]),
            Err(Error::BadChar(0xd800))
        );
        assert_eq!(
            Value::decode(&[tag::STRING, 1, 0, 0, 0, 0xff]),
            Err(Error::BadUtf8)
        );
        assert_eq!(
            Value::decode(&[0x77]),
            Err(Error::BadTag {
                what: "value",
                tag: 0x77
            })
        );
        assert_eq!(
            Value::decode(&[tag::BOOL, 1, 0]),
            Err(Error::TrailingBytes(1))
        );
        for (value, _) in samples() {
            let bytes = value.encode();
            for len in 0..bytes.len() {
                assert!(
                    Value::decode(&bytes[..len]).is_err(),
                    "{value:?} prefix {len}"
                );
            }
        }
    }
}
