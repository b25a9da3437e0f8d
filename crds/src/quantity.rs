//! Byte sizes written as Kubernetes quantities (`10Gi`, `512Mi`, `4096`).

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Why a byte quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("invalid quantity {0:?}: expected an integer with an optional suffix (Ki, Mi, Gi, Ti, Pi, k, M, G, T, P)")]
    Malformed(String),
    #[error("quantity {0:?} is not a whole number of bytes")]
    Fractional(String),
    #[error("quantity {0:?} is too large")]
    Overflow(String),
}

/// Parses a quantity into a whole number of bytes.
///
/// Accepts the binary (`Ki`…`Ei`) and decimal (`k`…`E`) suffixes and decimal exponents
/// (`1e9`), as the API server does; a result that is not a whole number of bytes is an error
/// rather than being rounded, because a volume size must be exact.
pub fn parse_bytes(q: &Quantity) -> Result<u64, QuantityError> {
    parse_bytes_str(&q.0)
}

pub fn parse_bytes_str(text: &str) -> Result<u64, QuantityError> {
    let s = text.trim();
    let malformed = || QuantityError::Malformed(text.to_string());
    let overflow = || QuantityError::Overflow(text.to_string());
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(malformed());
    }
    let (multiplier, exponent): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        other => {
            let exp = other.strip_prefix('e').or_else(|| other.strip_prefix('E')).ok_or_else(malformed)?;
            (1, exp.parse::<i32>().map_err(|_| malformed())?)
        }
    };
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) if !f.contains('.') => (w, f),
        Some(_) => return Err(malformed()),
        None => (number, ""),
    };
    let digits = format!("{whole}{frac}");
    let mut value: u128 = if digits.is_empty() {
        return Err(malformed());
    } else {
        digits.parse().map_err(|_| overflow())?
    };
    value = value.checked_mul(multiplier).ok_or_else(overflow)?;
    let mut exp = exponent - i32::try_from(frac.len()).map_err(|_| malformed())?;
    while exp > 0 {
        value = value.checked_mul(10).ok_or_else(overflow)?;
        exp -= 1;
    }
    while exp < 0 {
        if !value.is_multiple_of(10) {
            return Err(QuantityError::Fractional(text.to_string()));
        }
        value /= 10;
        exp += 1;
    }
    u64::try_from(value).map_err(|_| overflow())
}

/// Formats a byte count the way `kubectl` users read sizes.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["Ei", "Pi", "Ti", "Gi", "Mi", "Ki"];
    for (i, unit) in UNITS.iter().enumerate() {
        let size = 1u64 << (10 * (6 - i));
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{}", bytes / size, unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        let cases = [
            ("4096", 4096u64),
            ("4Ki", 4096),
            ("10Gi", 10 << 30),
            ("1.5Gi", 3 << 29),
            ("1G", 1_000_000_000),
            ("1e9", 1_000_000_000),
            ("512Mi", 512 << 20),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_bytes_str(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn refuses_fractional_and_malformed() {
        assert!(matches!(parse_bytes_str("1.5"), Err(QuantityError::Fractional(_))));
        assert!(matches!(parse_bytes_str("Gi"), Err(QuantityError::Malformed(_))));
        assert!(matches!(parse_bytes_str("10GB"), Err(QuantityError::Malformed(_))));
        assert!(matches!(parse_bytes_str("99999Ei"), Err(QuantityError::Overflow(_))));
    }

    #[test]
    fn formats_round_sizes() {
        assert_eq!(format_bytes(10 << 30), "10Gi");
        assert_eq!(format_bytes(4096), "4Ki");
        assert_eq!(format_bytes(1000), "1000");
    }
}
