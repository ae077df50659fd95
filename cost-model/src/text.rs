//! Numbers as the CLI prints them.

/// Up to 4 decimals, no trailing zeros, thousands separated: `5,256,000`, `0.25`.
pub fn number(v: f64) -> String {
    let text = format!("{v:.4}");
    group(text.trim_end_matches('0').trim_end_matches('.'))
}

/// Dollars and cents, thousands separated: `$1,234.50`, `-$6.02`.
pub fn usd(v: f64) -> String {
    let cents = format!("{:.2}", v.abs());
    let sign = if v < 0.0 && cents != "0.00" { "-" } else { "" };
    format!("{sign}${}", group(&cents))
}

/// Commas between thousands in the integer part of a plain decimal.
fn group(text: &str) -> String {
    let (sign, unsigned) = text.strip_prefix('-').map_or(("", text), |t| ("-", t));
    let (int, frac) = unsigned.split_once('.').map_or((unsigned, None), |(i, f)| (i, Some(f)));
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(number(5_256_000.0), "5,256,000");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(2.0), "2");
        assert_eq!(number(1234.5), "1,234.5");
        assert_eq!(number(-1.0), "-1");
    }

    #[test]
    fn money_has_cents_and_a_sign_before_the_dollar() {
        assert_eq!(usd(147.204), "$147.20");
        assert_eq!(usd(-6.02), "-$6.02");
        assert_eq!(usd(1234567.891), "$1,234,567.89");
        assert_eq!(usd(-0.001), "$0.00");
    }
}
