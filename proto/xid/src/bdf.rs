//! PCI addresses as the NVIDIA driver prints them, normalised to `dddd:bb:dd.f`.
use std::{fmt, str::FromStr};

use serde::{Serialize, Serializer};

/// A PCI bus/device/function with domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a PCI address: {0:?}")]
pub struct BdfError(pub String);

impl Bdf {
    /// Parses `PCI:dddd:bb:dd`, `dddd:bb:dd`, `dddd:bb:dd.f` and `bb:dd.f` (domain 0), with any
    /// case. The function defaults to 0 when the driver leaves it out.
    pub fn parse(s: &str) -> Result<Self, BdfError> {
        let err = || BdfError(s.to_string());
        let t = s.trim();
        let t = t
            .strip_prefix("PCI:")
            .or_else(|| t.strip_prefix("pci:"))
            .unwrap_or(t);
        let (main, function) = match t.rsplit_once('.') {
            Some((m, f)) => (m, parse_hex(f, 1).filter(|f| *f <= 7).ok_or_else(err)?),
            None => (t, 0),
        };
        let parts: Vec<&str> = main.split(':').collect();
        let (domain, bus, device) = match parts[..] {
            [d, b, dev] => (parse_hex(d, 8).ok_or_else(err)?, b, dev),
            [b, dev] => (0, b, dev),
            _ => return Err(err()),
        };
        let bus = parse_hex(bus, 2).ok_or_else(err)?;
        let device = parse_hex(device, 2)
            .filter(|d| *d <= 0x1f)
            .ok_or_else(err)?;
        Ok(Bdf {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

fn parse_hex(s: &str, max_len: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for Bdf {
    type Err = BdfError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl Serialize for Bdf {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_every_driver_shape() {
        for (input, want) in [
            ("PCI:0000:91:00", "0000:91:00.0"),
            ("0000:03:00", "0000:03:00.0"),
            ("0000:06:00.0", "0000:06:00.0"),
            ("PCI:0018:01:00", "0018:01:00.0"),
            ("PCI:0000:10:1c", "0000:10:1c.0"),
            ("0000:CB:00.1", "0000:cb:00.1"),
            ("3b:00.0", "0000:3b:00.0"),
        ] {
            assert_eq!(Bdf::parse(input).unwrap().to_string(), want, "{input}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "PCI:...",
            "",
            "0000:91",
            "0000:91:20",
            "0000:91:00.8",
            "zz:00:00",
            "1:2:3:4",
        ] {
            assert!(Bdf::parse(bad).is_err(), "{bad}");
        }
    }
}
