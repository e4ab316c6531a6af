//! NVIDIA XID knowledge shared by the gpulse agent and collector.
//!
//! * [`action`]: what to do about a GPU, NVIDIA's resolution buckets and gpulse's, with wording.
//! * [`catalog`]: every XID code 1-173 with NVIDIA's mnemonic, description and resolution
//!   buckets, plus a small NVSwitch SXid catalog.
//! * [`severity`]: the severity scale and the configurable policy that maps codes onto it.
//! * [`bdf`]: PCI bus/device/function parsing and normalisation to `dddd:bb:dd.f`.
//! * [`parse`]: the stateless parser for one kernel log record.
//! * [`decoder`]: the stateful layer over the parser (GPU UUID preambles, the no-Xid "fallen off
//!   the bus" message, SXid groups).
pub mod action;
pub mod bdf;
pub mod catalog;
pub mod decoder;
pub mod parse;
pub mod severity;

pub use bdf::Bdf;
pub use catalog::{XidInfo, lookup, lookup_sxid};
pub use decoder::{Decoded, Decoder};
pub use parse::{NvlinkDetail, ParsedRecord, RecoveryAction, SxidReport, XidReport, parse_record};
pub use severity::{Severity, SeverityPolicy};
