//! Fuzzes everything that reads kernel text: rendering stripping, the record parser, the
//! stateful decoder (across several records), PCI address parsing and severity policies.
#![no_main]

use gpulse_xid::{Bdf, Decoder, ParsedRecord, SeverityPolicy, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut decoder = Decoder::default();
    // Feed each line as a record, and the whole input as one multi-line record.
    for (i, line) in text.split('\n').enumerate() {
        let stripped = parse::strip_rendering(line);
        if let Some(ParsedRecord::Xid(x)) = parse::parse_record(stripped) {
            // Invariants: a parsed address renders and re-parses to itself.
            if let Some(p) = x.pci {
                assert_eq!(Bdf::parse(&p.to_string()), Ok(p));
            }
        }
        let _ = decoder.feed(i as u64 * 1_000_000, stripped);
        let _ = Bdf::parse(line);
    }
    let _ = parse::parse_record(&text);
    let _ = parse::find_bdf(&text);
    let _ = SeverityPolicy::parse(&text);
});
