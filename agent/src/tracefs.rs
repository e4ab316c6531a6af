//! tracefs: finding (or mounting) it and reading tracepoint field offsets from format files, so
//! the kernel programs never hard-code one kernel's layout.
use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at {path} failed: {err}")]
    MountFailed { path: String, err: std::io::Error },
    #[error("tracepoint {0} does not exist")]
    NoTracepoint(String),
    #[error("reading {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("field {field} not found in the format of {tracepoint}")]
    NoField { tracepoint: String, field: String },
}

/// One field of a tracepoint format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
    /// `__data_loc`: the field holds (len << 16 | offset) of variable-length data.
    pub data_loc: bool,
}

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Returns the tracefs root, mounting tracefs at /sys/kernel/tracing when no mount exists and
/// we are allowed to. `mounted` tells the caller whether this call did the mount.
pub fn ensure_mounted() -> Result<(PathBuf, bool), TracefsError> {
    for c in CANDIDATES {
        if Path::new(c).join("events").is_dir() {
            return Ok((PathBuf::from(c), false));
        }
    }
    let target = CANDIDATES[0];
    let src = CString::new("nodev").map_err(|e| mount_err(target, e.into()))?;
    let tgt = CString::new(target).map_err(|e| mount_err(target, e.into()))?;
    let fstype = CString::new("tracefs").map_err(|e| mount_err(target, e.into()))?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(mount_err(target, std::io::Error::last_os_error()));
    }
    Ok((PathBuf::from(target), true))
}

fn mount_err(path: &str, err: std::io::Error) -> TracefsError {
    TracefsError::MountFailed {
        path: path.to_string(),
        err,
    }
}

pub fn tracepoint_exists(root: &Path, category: &str, name: &str) -> bool {
    root.join("events")
        .join(category)
        .join(name)
        .join("format")
        .is_file()
}

/// Reads and parses `events/<category>/<name>/format`.
pub fn read_format(root: &Path, category: &str, name: &str) -> Result<Vec<Field>, TracefsError> {
    let path = root.join("events").join(category).join(name).join("format");
    if !path.is_file() {
        return Err(TracefsError::NoTracepoint(format!("{category}:{name}")));
    }
    let text = fs::read_to_string(&path).map_err(|err| TracefsError::Read {
        path: path.display().to_string(),
        err,
    })?;
    Ok(parse_format(&text))
}

/// Parses a tracefs format file; lines that are not fields are ignored.
pub fn parse_format(text: &str) -> Vec<Field> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in line.split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d.trim());
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.trim().parse().ok();
            } else if let Some(s) = part.strip_prefix("size:") {
                size = s.trim().parse().ok();
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        let Some(last) = decl.split_whitespace().last() else {
            continue;
        };
        let name = last.split('[').next().unwrap_or(last).to_string();
        out.push(Field {
            name,
            offset,
            size,
            data_loc: decl.contains("__data_loc"),
        });
    }
    out
}

/// Offset of `field` in `category:name`.
pub fn field(fields: &[Field], tracepoint: &str, field: &str) -> Result<Field, TracefsError> {
    fields
        .iter()
        .find(|f| f.name == field)
        .cloned()
        .ok_or_else(|| TracefsError::NoField {
            tracepoint: tracepoint.to_string(),
            field: field.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRINTK: &str = "name: console\nID: 418\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\tfield:__data_loc char[] msg;\toffset:8;\tsize:4;\tsigned:0;\n\nprint fmt: \"%s\", __get_str(msg)\n";
    const NVXID: &str = "name: nvidia_dev_xid\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:__data_loc char[] dev;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:u32 error_code;\toffset:12;\tsize:4;\tsigned:0;\n\tfield:__data_loc char[] msg;\toffset:16;\tsize:4;\tsigned:0;\n";

    #[test]
    fn parses_printk_and_nvidia_formats() {
        let f = parse_format(PRINTK);
        let msg = field(&f, "printk:console", "msg").unwrap();
        assert_eq!((msg.offset, msg.size, msg.data_loc), (8, 4, true));
        assert_eq!(field(&f, "printk:console", "common_pid").unwrap().offset, 4);
        let f = parse_format(NVXID);
        assert_eq!(field(&f, "x", "error_code").unwrap().offset, 12);
        assert!(!field(&f, "x", "error_code").unwrap().data_loc);
        assert_eq!(field(&f, "x", "msg").unwrap().offset, 16);
        assert!(matches!(
            field(&f, "x", "nope"),
            Err(TracefsError::NoField { .. })
        ));
        assert!(parse_format("garbage\n\tfield:;offset:x;size:;").is_empty());
    }

    #[test]
    fn real_tracefs_when_available() {
        // On this machine (root, tracefs present or mountable) the printk format must parse.
        let Ok((root, _)) = ensure_mounted() else {
            return;
        };
        if !tracepoint_exists(&root, "printk", "console") {
            return;
        }
        let f = read_format(&root, "printk", "console").unwrap();
        assert!(field(&f, "printk:console", "msg").unwrap().data_loc);
        assert!(matches!(
            read_format(&root, "nope", "nope"),
            Err(TracefsError::NoTracepoint(_))
        ));
    }
}
