//! Card data and US Social Security numbers in cleartext (DLP).
//!
//! A primary account number (PAN) is 13 to 19 digits, written together or in groups split
//! by one kind of separator (a space or a dash), standing alone (no letter or digit right
//! before or after), whose prefix and length belong to a card brand and whose Luhn check
//! digit is right. Sixteen digits that are not a card (an order number, a timestamp) fail
//! one of those tests nearly always: a random number passes Luhn one time in ten and a
//! brand prefix far less often. An SSN is `AAA-GG-SSSS` with the dashes, where the area is
//! not 000, 666 or 900–999, the group not 00 and the serial not 0000.
//!
//! What leaves this module is masked as PCI DSS 3.4.1 allows: at most the first six and
//! last four digits of a PAN (`411111******1111`), and the last four of an SSN
//! (`***-**-6789`). The full number is never copied out of the scanned bytes.

/// What was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataMatch {
    /// `pan` or `ssn`.
    pub kind: DataKind,
    /// The card brand (`visa`, `mastercard`, ...) for a PAN.
    pub brand: Option<&'static str>,
    /// The match, masked.
    pub masked: String,
    /// Offset of its first byte in the bytes scanned.
    pub at: usize,
    /// Bytes it spans there.
    pub len: usize,
}

/// Kinds of sensitive data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// A payment card number.
    Pan,
    /// A US Social Security number.
    Ssn,
}

impl DataKind {
    /// Stable name (records, metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            DataKind::Pan => "pan",
            DataKind::Ssn => "ssn",
        }
    }
}

/// Longest span a PAN can take: 19 digits and 18 separators.
pub const MAX_SPAN: usize = 37;

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// The brand of a PAN (digits only), if its prefix and length are a brand's.
pub fn brand(d: &[u8]) -> Option<&'static str> {
    let n = d.len();
    let num = |k: usize| -> u32 {
        d.iter()
            .take(k)
            .fold(0u32, |a, &c| a * 10 + u32::from(c - b'0'))
    };
    let (p1, p2, p3, p4, p6) = (num(1), num(2), num(3), num(4), num(6));
    if p1 == 4 && matches!(n, 13 | 16 | 19) {
        Some("visa")
    } else if ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && n == 16 {
        Some("mastercard")
    } else if matches!(p2, 34 | 37) && n == 15 {
        Some("amex")
    } else if (p4 == 6011
        || (644..=649).contains(&p3)
        || p2 == 65
        || (622126..=622925).contains(&p6))
        && (16..=19).contains(&n)
    {
        Some("discover")
    } else if (3528..=3589).contains(&p4) && (16..=19).contains(&n) {
        Some("jcb")
    } else if ((300..=305).contains(&p3) || matches!(p2, 36 | 38 | 39)) && (14..=19).contains(&n) {
        Some("diners")
    } else if p2 == 62 && (16..=19).contains(&n) {
        Some("unionpay")
    } else {
        None
    }
}

/// The Luhn check over ASCII digits.
pub fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &c) in d.iter().rev().enumerate() {
        let mut v = u32::from(c - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !d.is_empty() && sum % 10 == 0
}

/// `411111******1111`: the first six and last four digits, the rest starred.
pub fn mask_pan(d: &[u8]) -> String {
    let n = d.len();
    let mut s = String::with_capacity(n);
    for (i, &c) in d.iter().enumerate() {
        s.push(if i < 6 || i + 4 >= n {
            char::from(c)
        } else {
            '*'
        });
    }
    s
}

/// Finds PANs and SSNs in `data`. `open_start` says that the byte before `data[0]` is
/// unknown or not part of a word (a match may start at 0); `open_end` the same for the
/// byte after the end (a match may end there).
pub fn scan(data: &[u8], open_start: bool, open_end: bool) -> Vec<DataMatch> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let starts = data[i].is_ascii_digit()
            && (if i == 0 {
                open_start
            } else {
                !is_word(data[i - 1])
            });
        if !starts {
            i += 1;
            continue;
        }
        let plain_end = i + data[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        // Right after a separator that follows a digit, only an unseparated number may
        // start: a grouped run is judged whole from its first group.
        let continues =
            i >= 2 && matches!(data[i - 1], b' ' | b'-') && data[i - 2].is_ascii_digit();
        let grouped = if continues {
            None
        } else {
            run(data, i, open_end)
        };
        match grouped {
            Some((m, end)) => {
                out.push(m);
                i = end;
            }
            None => {
                let closed = if plain_end == data.len() {
                    open_end
                } else {
                    !is_word(data[plain_end])
                };
                if closed {
                    if let Some(m) = pan(&data[i..plain_end], i, plain_end - i) {
                        out.push(m);
                    }
                }
                i = plain_end;
            }
        }
    }
    out
}

/// A number at `i` written with one kind of separator between digits (or none): a PAN or
/// an SSN, and where it ends.
fn run(data: &[u8], i: usize, open_end: bool) -> Option<(DataMatch, usize)> {
    let mut digits = [0u8; 19];
    let mut nd = 0;
    let mut sep: Option<u8> = None;
    let mut j = i;
    while j < data.len() {
        let b = data[j];
        if b.is_ascii_digit() {
            if nd == digits.len() {
                return None; // more than 19 digits: not a card number
            }
            digits[nd] = b;
            nd += 1;
            j += 1;
        } else if (b == b' ' || b == b'-')
            && data.get(j + 1).is_some_and(u8::is_ascii_digit)
            && sep.map_or(true, |s| s == b)
        {
            sep = Some(b);
            j += 1;
        } else {
            break;
        }
    }
    let closed = if j == data.len() {
        open_end
    } else {
        !is_word(data[j])
    };
    if !closed {
        return None;
    }
    ssn(&data[i..j], i)
        .or_else(|| pan(&digits[..nd], i, j - i))
        .map(|m| (m, j))
}

fn pan(d: &[u8], at: usize, len: usize) -> Option<DataMatch> {
    if !(13..=19).contains(&d.len()) || !luhn(d) {
        return None;
    }
    let b = brand(d)?;
    Some(DataMatch {
        kind: DataKind::Pan,
        brand: Some(b),
        masked: mask_pan(d),
        at,
        len,
    })
}

fn ssn(s: &[u8], at: usize) -> Option<DataMatch> {
    if s.len() != 11 || s[3] != b'-' || s[6] != b'-' {
        return None;
    }
    let n = |a: usize, b: usize| {
        s[a..b].iter().try_fold(0u32, |v, &c| {
            c.is_ascii_digit().then(|| v * 10 + u32::from(c - b'0'))
        })
    };
    let (area, group, serial) = (n(0, 3)?, n(4, 6)?, n(7, 11)?);
    if area == 0 || area == 666 || area >= 900 || group == 0 || serial == 0 {
        return None;
    }
    let last4: String = s[7..11].iter().map(|&c| char::from(c)).collect();
    Some(DataMatch {
        kind: DataKind::Ssn,
        brand: None,
        masked: format!("***-**-{last4}"),
        at,
        len: 11,
    })
}

/// Replaces every PAN and SSN in `data` with `*` (digits only; separators stay), keeping
/// the first six and last four digits of a PAN: what a packet capture may keep.
pub fn mask_in_place(data: &mut [u8]) -> usize {
    let found = scan(data, true, true);
    for m in &found {
        let span = &mut data[m.at..m.at + m.len];
        let total = span.iter().filter(|c| c.is_ascii_digit()).count();
        let keep_head = if m.kind == DataKind::Pan { 6 } else { 0 };
        let mut k = 0;
        for c in span.iter_mut() {
            if c.is_ascii_digit() {
                if k >= keep_head && k + 4 < total {
                    *c = b'*';
                }
                k += 1;
            }
        }
    }
    found.len()
}

/// A scanner over a byte stream delivered in pieces: a number split across two pieces is
/// found once, when its last piece arrives.
#[derive(Debug, Default, Clone)]
pub struct StreamScanner {
    carry: Vec<u8>,
    /// The byte before `carry[0]` was part of a word (so a match cannot start at 0).
    carry_mid_word: bool,
}

impl StreamScanner {
    /// Scans the next piece of the stream; matches that end inside it are returned (with
    /// `at` relative to the piece, saturating at 0 for one that began in an earlier piece).
    pub fn feed(&mut self, piece: &[u8]) -> Vec<DataMatch> {
        if piece.is_empty() {
            return Vec::new();
        }
        let c = self.carry.len();
        let mut buf = Vec::with_capacity(c + piece.len());
        buf.extend_from_slice(&self.carry);
        buf.extend_from_slice(piece);
        let found: Vec<DataMatch> = scan(&buf, !self.carry_mid_word, true)
            .into_iter()
            .filter(|m| m.at + m.len > c)
            .map(|mut m| {
                m.at = m.at.saturating_sub(c);
                m
            })
            .collect();
        let keep = buf.len().min(MAX_SPAN + 1);
        let start = buf.len() - keep;
        self.carry_mid_word = start > 0 && is_word(buf[start - 1]);
        self.carry = buf[start..].to_vec();
        // A number the last piece ended in is not reported again when it continues.
        if found.iter().any(|m| m.at + m.len == piece.len()) {
            self.carry.clear();
            self.carry_mid_word = true;
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<String> {
        scan(s.as_bytes(), true, true)
            .into_iter()
            .map(|m| format!("{}:{}", m.brand.unwrap_or("ssn"), m.masked))
            .collect()
    }

    #[test]
    fn card_numbers_of_each_brand_are_found_and_masked() {
        assert_eq!(
            kinds("card=4111111111111111&x=1"),
            ["visa:411111******1111"]
        );
        assert_eq!(
            kinds("5500 0000 0000 0004"),
            ["mastercard:550000******0004"]
        );
        assert_eq!(kinds("3782-822463-10005"), ["amex:378282*****0005"]);
        assert_eq!(kinds("6011111111111117"), ["discover:601111******1117"]);
        assert_eq!(kinds("3530111333300000"), ["jcb:353011******0000"]);
        assert_eq!(kinds("2221000000000009"), ["mastercard:222100******0009"]);
        assert_eq!(
            kinds("4111111111111111 5500000000000004,378282246310005"),
            [
                "visa:411111******1111",
                "mastercard:550000******0004",
                "amex:378282*****0005"
            ]
        );
    }

    #[test]
    fn numbers_that_are_not_cards_are_not_reported() {
        // Luhn fails.
        assert!(kinds("4111111111111112").is_empty());
        // Luhn-valid, 16 digits, but no brand starts with 9.
        assert!(kinds("9111111111111110").is_empty());
        // Part of a longer number, or glued to letters.
        assert!(kinds("14111111111111111").is_empty());
        assert!(kinds("id4111111111111111").is_empty());
        assert!(kinds("41111111111111110000").is_empty());
        assert!(kinds("1234 5678 9012 3456 5500 0000 0000 0004").is_empty());
        // Mixed separators.
        assert!(kinds("4111 1111-1111 1111").is_empty());
        // A timestamp and an order number.
        assert!(kinds("1732612345678901").is_empty());
        assert!(kinds("order 2026112500001234").is_empty());
    }

    #[test]
    fn ssns_need_their_dashes_and_valid_parts() {
        assert_eq!(kinds("ssn: 123-45-6789."), ["ssn:***-**-6789"]);
        assert!(kinds("123456789").is_empty());
        assert!(kinds("000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000").is_empty());
    }

    #[test]
    fn a_number_split_across_pieces_is_found_once() {
        let mut s2 = StreamScanner::default();
        let a = s2.feed(b"pan=4111 1111 ");
        let b = s2.feed(b"1111 1111&next");
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].masked, "411111******1111");
        // A piece that ends on a valid number reports it at once; its continuation does
        // not report it again.
        let mut s3 = StreamScanner::default();
        assert_eq!(s3.feed(b"x 4111111111111111").len(), 1);
        assert!(s3.feed(b" and more").is_empty());
        // A long digit run split across pieces is not a card.
        let mut s4 = StreamScanner::default();
        s4.feed(b"n=12345678901234567890123");
        assert!(s4.feed(b"4111111111111111 ").is_empty());
    }

    #[test]
    fn masking_in_place_keeps_six_and_four() {
        let mut b = b"a=4111-1111-1111-1111 b=123-45-6789".to_vec();
        assert_eq!(mask_in_place(&mut b), 2);
        assert_eq!(&b, b"a=4111-11**-****-1111 b=***-**-6789");
    }
}
