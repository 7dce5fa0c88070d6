//! This kernel's struct layout, as far as `zt_splice` needs it (`zt_common::KernelLayout`): the
//! byte offsets of three fields, read from the kernel's own type information (BTF) when the
//! agent loads the programs, because they differ between kernel builds. Also whether the cut is
//! safe on this kernel at all: its sockmap receive path must move the read position by what the
//! program let through (the kernels that have `tcp_eat_skb`, 6.4 and later), and reading kernel
//! memory must be allowed (not under lockdown's confidentiality mode).
use std::path::{Path, PathBuf};

use btf_rs::{Btf, Struct, Type};
use zt_common::KernelLayout;

/// Where the running kernel describes its types.
pub(super) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The kernel's lockdown mode, where the lockdown LSM is built in.
const LOCKDOWN: &str = "/sys/kernel/security/lockdown";
/// The function, present from 6.4, by which a redirect moves the socket's read position by the
/// length the program left (earlier kernels moved it by the length before the program ran).
const READ_POSITION_FOLLOWS_CUT: &str = "tcp_eat_skb";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: reading the kernel's type information: {source}")]
    Read {
        path: PathBuf,
        source: btf_rs::Error,
    },
    #[error("{path}: no struct {name}")]
    NoStruct { path: PathBuf, name: &'static str },
    #[error("{path}: struct {strukt} has no field {field}")]
    NoField {
        path: PathBuf,
        strukt: &'static str,
        field: &'static str,
    },
    #[error("{path}: no function {name}: the kernel is older than 6.4")]
    TooOld { path: PathBuf, name: &'static str },
    #[error("{LOCKDOWN}: confidentiality mode forbids reading kernel memory")]
    Lockdown,
}

/// Reads the offsets from the BTF file at `path` (the kernel's: [`VMLINUX_BTF`]).
pub(super) fn read(path: &Path) -> Result<KernelLayout, LayoutError> {
    if std::fs::read_to_string(LOCKDOWN).is_ok_and(|mode| mode.contains("[confidentiality]")) {
        return Err(LayoutError::Lockdown);
    }
    let btf = Btf::from_file(path).map_err(|source| LayoutError::Read {
        path: path.into(),
        source,
    })?;
    let has_function = btf
        .resolve_types_by_name(READ_POSITION_FOLLOWS_CUT)
        .is_ok_and(|types| types.iter().any(|t| matches!(t, Type::Func(_))));
    if !has_function {
        return Err(LayoutError::TooOld {
            path: path.into(),
            name: READ_POSITION_FOLLOWS_CUT,
        });
    }
    let offset = |strukt: &'static str, field: &'static str| {
        let found = btf
            .resolve_types_by_name(strukt)
            .ok()
            .and_then(|types| {
                types.into_iter().find_map(|t| match t {
                    Type::Struct(s) => Some(s),
                    _ => None,
                })
            })
            .ok_or(LayoutError::NoStruct {
                path: path.into(),
                name: strukt,
            })?;
        field_offset(&btf, &found, field).ok_or(LayoutError::NoField {
            path: path.into(),
            strukt,
            field,
        })
    };
    Ok(KernelLayout {
        skb_sk: offset("sk_buff", "sk")?,
        skb_seq: offset("sk_buff", "cb")? + offset("tcp_skb_cb", "seq")?,
        tcp_copied_seq: offset("tcp_sock", "copied_seq")?,
        _pad: 0,
    })
}

/// Byte offset of `field` in `strukt`, also inside its anonymous structs and unions (the kernel
/// puts `sk_buff.sk` in one).
fn field_offset(btf: &Btf, strukt: &Struct, field: &str) -> Option<u32> {
    strukt.members.iter().find_map(|member| {
        let name = btf.resolve_name(member).ok()?;
        let here = member.bit_offset() / 8;
        if name == field {
            return Some(here);
        }
        if !name.is_empty() {
            return None;
        }
        match btf.resolve_chained_type(member).ok()? {
            Type::Struct(inner) | Type::Union(inner) => {
                field_offset(btf, &inner, field).map(|o| here + o)
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's own BTF: every test machine has one (the eBPF programs need it too).
    #[test]
    fn finds_the_three_fields_in_the_running_kernel() {
        let layout = read(Path::new(VMLINUX_BTF)).expect("the kernel's BTF");
        assert!(layout.is_known());
        // sk_buff declares cb after sk; tcp_sock opens with its inet_connection_sock.
        assert!(layout.skb_seq > layout.skb_sk, "{layout:?}");
        assert!(layout.tcp_copied_seq > 0, "{layout:?}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = read(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/vmlinux: "),
            "{err}"
        );
    }
}
