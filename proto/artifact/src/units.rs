//! Sizes as people read them, written the same way in the control plane's placement
//! reasons, the agent's refusals and the CLI, so one model's size reads alike in all three.

/// `n` bytes in the largest binary unit it reaches, to three significant digits: `512 B`,
/// `1.50 KiB`, `344 MiB`, `70.0 MiB`, `4.04 GiB`. Three digits keep two sizes that differ
/// by a percent (a model's need and what is left) from reading alike.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    // 1023.5 and up would print as 1024 of this unit: that is 1.00 of the next.
    while value >= 1023.5 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    // Decimals by what the value rounds to, so 9.999 reads 10.0 and 99.96 reads 100.
    let decimals = match value {
        _ if unit == 0 => 0,
        v if v < 9.995 => 2,
        v if v < 99.95 => 1,
        _ => 0,
    };
    format!("{value:.decimals$} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::bytes;

    #[test]
    fn bytes_are_shown_in_the_largest_binary_unit_they_reach() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(70 << 20), "70.0 MiB");
        assert_eq!(bytes(344 << 20), "344 MiB");
        assert_eq!(bytes(3 << 29), "1.50 GiB");
        assert_eq!(bytes(3 << 40), "3.00 TiB");
        assert_eq!(bytes(5 << 50), "5120 TiB");
        assert_eq!(bytes(10_239), "10.0 KiB", "9.999 KiB");
        assert_eq!(bytes(102_350), "100 KiB", "99.95 KiB");
        assert_eq!(bytes((1 << 20) - 200), "1.00 MiB", "1023.8 KiB");
        assert_eq!(bytes(1023), "1023 B");
        // A need and what is left a percent apart do not read alike.
        let gib = |x: f64| (x * (1u64 << 30) as f64) as u64;
        assert_ne!(bytes(gib(4.04)), bytes(gib(3.99)));
    }
}
