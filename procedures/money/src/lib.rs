//! Exact fixed-point money and the drain arithmetic of a billcl account.
//!
//! Money never touches a float: a [`Decimal`] is a count of micro-units (10^-6) in an `i64`.
//! An [`Account`] holds a balance that drains continuously at a velocity (units per second);
//! reads compute the balance at a moment, writes re-anchor it. The carried sub-micro remainder
//! makes any sequence of re-anchors drain exactly what one long drain would (no drift), and
//! every rounding is down, in the account holder's favour.
//!
//! This crate is sans-I/O, has no dependencies, and is compiled both into the host and into
//! wasm guests, so the same arithmetic runs on every replica.

use std::fmt;
use std::str::FromStr;

/// Micro-units in one unit: a [`Decimal`] has six fractional digits.
pub const MICROS_PER_UNIT: i64 = 1_000_000;
/// Fractional digits a [`Decimal`] carries.
pub const FRACTION_DIGITS_MAX: usize = 6;
/// Milliseconds per second: velocity is per second, time is in milliseconds, so a drain is
/// `velocity_micros * elapsed_ms / MILLIS_PER_SECOND` micros, and the remainder is in
/// thousandths of a micro.
pub const MILLIS_PER_SECOND: i64 = 1_000;

/// An exact decimal amount: a signed count of micro-units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Decimal(i64);

impl Decimal {
    /// Zero.
    pub const ZERO: Decimal = Decimal(0);
    /// The largest amount, 9223372036854.775807.
    pub const MAX: Decimal = Decimal(i64::MAX);
    /// The smallest amount, -9223372036854.775808.
    pub const MIN: Decimal = Decimal(i64::MIN);

    /// The amount of `micros` micro-units.
    pub const fn from_micros(micros: i64) -> Decimal {
        Decimal(micros)
    }

    /// The amount in micro-units.
    pub const fn micros(self) -> i64 {
        self.0
    }

    /// `units` whole units, or `None` if that does not fit.
    pub fn from_units(units: i64) -> Option<Decimal> {
        units.checked_mul(MICROS_PER_UNIT).map(Decimal)
    }

    /// Parses `1.5`, `-3`, `+2`, `0.00001`, `1000`. At most six fractional digits; empty text,
    /// anything that is not digits with an optional sign and point, and amounts out of range
    /// are errors whose message names the problem.
    pub fn parse(text: &str) -> Result<Decimal, ParseDecimalError> {
        let error = |kind| ParseDecimalError {
            text: text.to_string(),
            kind,
        };
        if text.is_empty() {
            return Err(error(ParseDecimalErrorKind::Empty));
        }
        let (negative, unsigned) = match text.as_bytes()[0] {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let (whole, fraction) = match unsigned.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (unsigned, None),
        };
        let all_digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) {
            return Err(error(ParseDecimalErrorKind::Invalid));
        }
        if let Some(fraction) = fraction {
            if fraction.is_empty() || !all_digits(fraction) {
                return Err(error(ParseDecimalErrorKind::Invalid));
            }
            if fraction.len() > FRACTION_DIGITS_MAX {
                return Err(error(ParseDecimalErrorKind::TooPrecise));
            }
        }
        // Accumulate as a negative number so that i64::MIN parses.
        let mut micros: i64 = 0;
        let overflow = || error(ParseDecimalErrorKind::OutOfRange);
        for byte in whole.bytes() {
            micros = micros
                .checked_mul(10)
                .and_then(|m| m.checked_sub(i64::from(byte - b'0')))
                .ok_or_else(overflow)?;
        }
        micros = micros.checked_mul(MICROS_PER_UNIT).ok_or_else(overflow)?;
        let fraction = fraction.unwrap_or("");
        let mut scale = MICROS_PER_UNIT / 10;
        for byte in fraction.bytes() {
            micros = micros
                .checked_sub(i64::from(byte - b'0') * scale)
                .ok_or_else(overflow)?;
            scale /= 10;
        }
        if negative {
            Ok(Decimal(micros))
        } else {
            micros.checked_neg().map(Decimal).ok_or_else(overflow)
        }
    }

    /// `self + other`, or `None` on overflow.
    pub fn checked_add(self, other: Decimal) -> Option<Decimal> {
        self.0.checked_add(other.0).map(Decimal)
    }

    /// `self - other`, or `None` on overflow.
    pub fn checked_sub(self, other: Decimal) -> Option<Decimal> {
        self.0.checked_sub(other.0).map(Decimal)
    }

    /// `-self`, or `None` for [`Decimal::MIN`].
    pub fn checked_neg(self) -> Option<Decimal> {
        self.0.checked_neg().map(Decimal)
    }

    /// Whether the amount is greater than zero.
    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// Whether the amount is less than zero.
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Whether the amount is zero.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Decimal {
    /// Writes the shortest exact form: `1.5`, `1000`, `0.00001`, `-2.25`, `0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let magnitude = self.0.unsigned_abs();
        let unit = MICROS_PER_UNIT.unsigned_abs();
        let whole = magnitude / unit;
        let fraction = magnitude % unit;
        let sign = if self.0 < 0 { "-" } else { "" };
        if fraction == 0 {
            return write!(f, "{sign}{whole}");
        }
        let digits = format!("{fraction:06}");
        write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

impl FromStr for Decimal {
    type Err = ParseDecimalError;

    fn from_str(text: &str) -> Result<Decimal, ParseDecimalError> {
        Decimal::parse(text)
    }
}

/// Why a text is not a [`Decimal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseDecimalError {
    text: String,
    kind: ParseDecimalErrorKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ParseDecimalErrorKind {
    Empty,
    Invalid,
    TooPrecise,
    OutOfRange,
}

impl ParseDecimalError {
    /// The text that failed to parse.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the text is not shaped like a decimal at all (empty or junk), as opposed to a
    /// well-formed number that is too precise or out of range.
    pub fn is_malformed(&self) -> bool {
        matches!(
            self.kind,
            ParseDecimalErrorKind::Empty | ParseDecimalErrorKind::Invalid
        )
    }
}

impl fmt::Display for ParseDecimalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = &self.text;
        match self.kind {
            ParseDecimalErrorKind::Empty => {
                write!(
                    f,
                    "an empty text is not a decimal number (expected e.g. 1000 or 0.5)"
                )
            }
            ParseDecimalErrorKind::Invalid => {
                write!(
                    f,
                    "`{text}` is not a decimal number (expected e.g. 1000 or 0.5)"
                )
            }
            ParseDecimalErrorKind::TooPrecise => write!(
                f,
                "`{text}` has more than {FRACTION_DIGITS_MAX} fractional digits \
                 (the smallest amount is 0.000001)"
            ),
            ParseDecimalErrorKind::OutOfRange => write!(
                f,
                "`{text}` is out of range (amounts lie between {} and {})",
                Decimal::MIN,
                Decimal::MAX
            ),
        }
    }
}

impl std::error::Error for ParseDecimalError {}

/// An account whose balance drains at `velocity` units per second from `since_ms`.
///
/// Invariants: `remainder < 1000` (thousandths of a micro not yet drained); a re-anchored
/// account whose balance reached zero has `remainder == 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Account {
    /// The account id (the sharding key).
    pub id: u64,
    /// The balance at `since_ms`.
    pub balance: Decimal,
    /// Units drained per second; zero or negative drains nothing.
    pub velocity: Decimal,
    /// The moment (Unix milliseconds) `balance` was anchored at.
    pub since_ms: i64,
    /// Drain carried from earlier anchors, in thousandths of a micro-unit (0..1000).
    pub remainder: u32,
}

/// Drain of an account, computed once and shared by `balance_at` and `anchored_at`.
struct Drain {
    /// Whole micros to take off the balance.
    micros: i128,
    /// Thousandths of a micro left over (0..1000).
    remainder: u32,
}

impl Account {
    /// A new account anchored at `now_ms` with nothing carried.
    pub fn new(id: u64, balance: Decimal, velocity: Decimal, now_ms: i64) -> Account {
        Account {
            id,
            balance,
            velocity,
            since_ms: now_ms,
            remainder: 0,
        }
    }

    fn drain_until(&self, now_ms: i64) -> Drain {
        assert!(
            self.remainder < MILLIS_PER_SECOND as u32,
            "remainder out of range"
        );
        let elapsed_ms = i128::from(now_ms) - i128::from(self.since_ms);
        if elapsed_ms <= 0 || self.velocity.micros() <= 0 {
            return Drain {
                micros: 0,
                remainder: self.remainder,
            };
        }
        // |velocity| < 2^63, elapsed < 2^64: the product fits in i128 with room to spare.
        let total = i128::from(self.velocity.micros()) * elapsed_ms + i128::from(self.remainder);
        let per_micro = i128::from(MILLIS_PER_SECOND);
        Drain {
            micros: total / per_micro,
            remainder: (total % per_micro) as u32,
        }
    }

    /// Balance at `now_ms`: the stored balance minus what the velocity drained since
    /// `since_ms`, floored at zero. The drain is
    /// `(velocity_micros * (now_ms - since_ms) + remainder) / 1000` micros, rounded down (in the
    /// holder's favour). `now_ms < since_ms` counts as no time passed. A balance that is
    /// already zero or negative does not drain.
    pub fn balance_at(&self, now_ms: i64) -> Decimal {
        if self.balance.micros() <= 0 {
            return self.balance;
        }
        let drain = self.drain_until(now_ms);
        let left = i128::from(self.balance.micros()) - drain.micros;
        Decimal(left.max(0) as i64)
    }

    /// The account re-anchored at `now_ms`: `balance = balance_at(now_ms)`, `since_ms = now_ms`
    /// (if later), `remainder` = the fractional drain carried; if the balance reached zero the
    /// remainder resets to zero.
    pub fn anchored_at(&self, now_ms: i64) -> Account {
        if now_ms <= self.since_ms {
            return *self;
        }
        let mut next = Account {
            since_ms: now_ms,
            ..*self
        };
        if self.balance.micros() <= 0 {
            next.remainder = 0;
            return next;
        }
        let drain = self.drain_until(now_ms);
        let left = i128::from(self.balance.micros()) - drain.micros;
        if left <= 0 {
            next.balance = Decimal::ZERO;
            next.remainder = 0;
        } else {
            next.balance = Decimal(left as i64);
            next.remainder = drain.remainder;
        }
        next
    }

    /// The first millisecond at which `balance_at(ms)` is zero: `Some(since_ms)` if the
    /// balance is already zero (or negative); `None` if the velocity is zero or negative (it
    /// never runs dry) or the moment lies beyond `i64` milliseconds.
    pub fn depleted_at_ms(&self) -> Option<i64> {
        if self.balance.micros() <= 0 {
            return Some(self.since_ms);
        }
        let velocity = i128::from(self.velocity.micros());
        if velocity <= 0 {
            return None;
        }
        // Smallest elapsed with velocity * elapsed + remainder >= balance * 1000.
        let needed = i128::from(self.balance.micros()) * i128::from(MILLIS_PER_SECOND)
            - i128::from(self.remainder);
        assert!(needed > 0, "a positive balance needs a positive drain");
        let elapsed_ms = (needed + velocity - 1) / velocity;
        i64::try_from(i128::from(self.since_ms) + elapsed_ms).ok()
    }
}

/// Conversions between a guest's bindings of the WIT `billcl:host/types` records — `account`
/// and `decimal`, which `wit_bindgen::generate!` writes into each guest crate — and
/// [`Account`] / [`Decimal`], so that no guest writes them again.
///
/// `billcl_money::wit_conversions!(billcl::host::types);` (the path of the generated `types`
/// module) defines, in the calling module:
/// - `to_money(types::Account) -> Account` (an account as stored, to drain with this crate),
/// - `to_wit(&Account) -> types::Account` (to hand back to `accounts::put`),
/// - `to_wit_decimal(Decimal) -> types::Decimal` (a result for the caller).
#[macro_export]
macro_rules! wit_conversions {
    ($($types:ident)::+) => {
        /// The stored account as billcl-money's `Account`, to drain.
        #[allow(dead_code)]
        fn to_money(account: $($types)::+::Account) -> $crate::Account {
            $crate::Account {
                id: account.id,
                balance: $crate::Decimal::from_micros(account.balance.micros),
                velocity: $crate::Decimal::from_micros(account.velocity.micros),
                since_ms: account.since_ms,
                remainder: account.remainder,
            }
        }

        /// The account as the host's WIT record, to store.
        #[allow(dead_code)]
        fn to_wit(account: &$crate::Account) -> $($types)::+::Account {
            $($types)::+::Account {
                id: account.id,
                balance: to_wit_decimal(account.balance),
                velocity: to_wit_decimal(account.velocity),
                since_ms: account.since_ms,
                remainder: account.remainder,
            }
        }

        /// The amount as the host's WIT `decimal` record.
        #[allow(dead_code)]
        fn to_wit_decimal(value: $crate::Decimal) -> $($types)::+::Decimal {
            $($types)::+::Decimal {
                micros: value.micros(),
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        Decimal::parse(text).unwrap()
    }

    #[test]
    fn parse_and_format_table() {
        let cases = [
            ("0", 0, "0"),
            ("-0", 0, "0"),
            ("1", 1_000_000, "1"),
            ("+2", 2_000_000, "2"),
            ("1.5", 1_500_000, "1.5"),
            ("1.500000", 1_500_000, "1.5"),
            ("-3", -3_000_000, "-3"),
            ("-2.25", -2_250_000, "-2.25"),
            ("0.00001", 10, "0.00001"),
            ("0.000001", 1, "0.000001"),
            ("-0.000001", -1, "-0.000001"),
            ("1000", 1_000_000_000, "1000"),
            ("007.10", 7_100_000, "7.1"),
            ("9223372036854.775807", i64::MAX, "9223372036854.775807"),
            ("-9223372036854.775808", i64::MIN, "-9223372036854.775808"),
        ];
        for (text, micros, shown) in cases {
            let value = Decimal::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(value.micros(), micros, "{text}");
            assert_eq!(value.to_string(), shown, "{text}");
            assert_eq!(
                shown.parse::<Decimal>().unwrap(),
                value,
                "round trip {text}"
            );
        }
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let cases = [
            ("", "empty"),
            (
                "abc",
                "`abc` is not a decimal number (expected e.g. 1000 or 0.5)",
            ),
            ("1.", "not a decimal number"),
            (".5", "not a decimal number"),
            ("1.2.3", "not a decimal number"),
            ("-", "not a decimal number"),
            ("1e5", "not a decimal number"),
            (" 1", "not a decimal number"),
            ("--1", "not a decimal number"),
            ("0.0000001", "more than 6 fractional digits"),
            ("9223372036854.775808", "out of range"),
            ("-9223372036854.775809", "out of range"),
            ("99999999999999999999", "out of range"),
        ];
        for (text, message) in cases {
            let error = Decimal::parse(text).expect_err(text);
            assert!(error.to_string().contains(message), "{text}: {error}");
            assert_eq!(error.text(), text);
        }
    }

    #[test]
    fn checked_arithmetic() {
        assert_eq!(Decimal::from_units(3), Some(d("3")));
        assert_eq!(Decimal::from_units(i64::MAX / 1_000_000 + 1), None);
        assert_eq!(d("1.5").checked_add(d("2.25")), Some(d("3.75")));
        assert_eq!(d("1.5").checked_sub(d("2.25")), Some(d("-0.75")));
        assert_eq!(Decimal::MAX.checked_add(Decimal::from_micros(1)), None);
        assert_eq!(Decimal::MIN.checked_sub(Decimal::from_micros(1)), None);
        assert_eq!(Decimal::MIN.checked_neg(), None);
        assert!(d("0.000001").is_positive() && !d("0").is_positive());
        assert!(d("-0.000001").is_negative() && !d("0").is_negative());
        assert_eq!(Decimal::ZERO, Decimal::default());
    }

    #[test]
    fn drain_over_time() {
        // 1 unit per second for 1.5 s drains 1.5 units.
        let account = Account::new(4, d("10"), d("1"), 1_000);
        assert_eq!(account.balance_at(2_500), d("8.5"));
        assert_eq!(account.balance_at(1_000), d("10"));
        // Time running backwards counts as no time passed.
        assert_eq!(account.balance_at(0), d("10"));
        // The seed's tiny velocity: 0.00001/s = 10 micros/s = 0.01 micro/ms.
        let slow = Account::new(1, d("1"), d("0.00001"), 0);
        assert_eq!(slow.balance_at(99), d("1")); // 0.99 micro drained: rounds down to 0
        assert_eq!(slow.balance_at(100), d("0.999999"));
        assert_eq!(slow.balance_at(86_400_000), d("0.136"));
    }

    #[test]
    fn floor_at_zero() {
        let account = Account::new(4, d("1"), d("1"), 0);
        assert_eq!(account.balance_at(999), d("0.001"));
        assert_eq!(account.balance_at(1_000), d("0"));
        assert_eq!(account.balance_at(1_000_000), d("0"));
        assert_eq!(account.balance_at(i64::MAX), d("0"));
        let anchored = account.anchored_at(5_000);
        assert_eq!(
            (anchored.balance, anchored.remainder, anchored.since_ms),
            (d("0"), 0, 5_000)
        );
        // Huge velocity and time never overflow.
        let fast = Account::new(1, Decimal::MAX, Decimal::MAX, i64::MIN);
        assert_eq!(fast.balance_at(i64::MAX), d("0"));
    }

    #[test]
    fn non_positive_velocity_does_not_drain() {
        let account = Account::new(4, d("5"), d("-1"), 0);
        assert_eq!(account.balance_at(10_000), d("5"));
        assert_eq!(account.depleted_at_ms(), None);
        let still = Account::new(4, d("5"), d("0"), 0);
        assert_eq!(still.anchored_at(10_000).balance, d("5"));
        assert_eq!(still.depleted_at_ms(), None);
    }

    #[test]
    fn rounding_in_holders_favour() {
        // 1 micro per second is 0.001 micro per millisecond: nothing is taken until a whole
        // micro has drained, and the carried remainder remembers the part-micro.
        let account = Account::new(4, d("1"), Decimal::from_micros(1), 0);
        assert_eq!(account.balance_at(999).micros(), 1_000_000);
        assert_eq!(account.balance_at(1_000).micros(), 999_999);
        let anchored = account.anchored_at(999);
        assert_eq!(
            (anchored.balance.micros(), anchored.remainder),
            (1_000_000, 999)
        );
        assert_eq!(anchored.balance_at(1_000).micros(), 999_999);
    }

    #[test]
    fn anchoring_keeps_time_monotonic() {
        let account = Account::new(4, d("10"), d("1"), 5_000);
        assert_eq!(account.anchored_at(4_000), account);
        assert_eq!(account.anchored_at(5_000), account);
        let later = account.anchored_at(6_000);
        assert_eq!((later.balance, later.since_ms), (d("9"), 6_000));
    }

    /// A tiny deterministic generator (Knuth's MMIX LCG) for property tests without a dep.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn no_drift_over_many_reanchors() {
        let mut rng = Lcg(42);
        for _round in 0..20 {
            let velocity = Decimal::from_micros((rng.next() % 5_000_000) as i64 + 1);
            let start = Account::new(7, Decimal::from_units(1_000_000).unwrap(), velocity, 1_000);
            let mut account = start;
            let mut now_ms = 1_000;
            for _ in 0..10_000 {
                now_ms += (rng.next() % 37) as i64;
                account = account.anchored_at(now_ms);
                // Re-reads in between change nothing.
                assert_eq!(account.balance_at(now_ms), account.balance);
            }
            let expected = start.balance_at(now_ms);
            let drift = (account.balance.micros() - expected.micros()).abs();
            assert!(drift <= 1, "drift {drift} micros at velocity {velocity}");
            if expected.is_positive() {
                assert_eq!(account.balance, expected, "exact while above zero");
            }
        }
    }

    #[test]
    fn depletion_moment_is_exact() {
        let mut rng = Lcg(7);
        for _ in 0..2_000 {
            let balance = Decimal::from_micros((rng.next() % 10_000_000) as i64 + 1);
            let velocity = Decimal::from_micros((rng.next() % 3_000_000) as i64 + 1);
            let since_ms = (rng.next() % 1_000_000) as i64;
            let mut account = Account::new(1, balance, velocity, since_ms);
            account.remainder = (rng.next() % 1_000) as u32;
            let moment = account
                .depleted_at_ms()
                .expect("positive velocity runs dry");
            assert!(moment > since_ms);
            assert_eq!(account.balance_at(moment), Decimal::ZERO);
            assert!(
                account.balance_at(moment - 1).is_positive(),
                "{account:?} at {moment}"
            );
        }
        let empty = Account::new(1, Decimal::ZERO, d("1"), 77);
        assert_eq!(empty.depleted_at_ms(), Some(77));
        // 1 unit at 1 unit/s runs dry exactly one second later.
        assert_eq!(
            Account::new(1, d("1"), d("1"), 10).depleted_at_ms(),
            Some(1_010)
        );
        // Beyond the representable future.
        let slow = Account::new(1, Decimal::MAX, Decimal::from_micros(1), i64::MAX - 10);
        assert_eq!(slow.depleted_at_ms(), None);
    }

    /// What `wit_bindgen::generate!` writes for `billcl:host/types` (field for field).
    mod wit {
        pub mod types {
            #[derive(Clone, Copy, Debug, PartialEq)]
            pub struct Decimal {
                pub micros: i64,
            }
            #[derive(Clone, Copy, Debug, PartialEq)]
            pub struct Account {
                pub id: u64,
                pub balance: Decimal,
                pub velocity: Decimal,
                pub since_ms: i64,
                pub remainder: u32,
            }
        }
    }

    crate::wit_conversions!(wit::types);

    #[test]
    fn wit_conversions_round_trip_every_field() {
        let stored = wit::types::Account {
            id: 4,
            balance: wit::types::Decimal { micros: 1_500_000 },
            velocity: wit::types::Decimal { micros: 10 },
            since_ms: 1_700_000_000_000,
            remainder: 999,
        };
        let account = to_money(stored);
        assert_eq!(
            account,
            Account {
                id: 4,
                balance: Decimal::from_micros(1_500_000),
                velocity: Decimal::from_micros(10),
                since_ms: 1_700_000_000_000,
                remainder: 999,
            }
        );
        assert_eq!(to_wit(&account), stored);
        assert_eq!(
            to_wit_decimal(Decimal::from_micros(-7)),
            wit::types::Decimal { micros: -7 }
        );
    }
}
