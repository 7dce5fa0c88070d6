//! The same-node fast path's kernel side: the agent's two sockets of one connection spliced by
//! `zt_splice`, so that what each receives leaves through the other without entering user space.
//! The agent still owns both sockets: it sees each direction's end (FIN), closes them when policy
//! says so, and reads the bytes the kernel counted.
use std::{
    io,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};
use zt_common::{SpliceLink, map_names};

use super::{CaptureError, sockets::socket_cookie};

const PROGRAM: &str = "zt_splice";

struct Maps {
    sources: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    links: HashMap<MapData, u64, SpliceLink>,
}

/// Splices pairs of the agent's sockets in the kernel. Cheap to clone.
#[derive(Clone)]
pub struct Splicer(Arc<Mutex<Maps>>);

impl Splicer {
    /// Takes the splice maps out of the node-wide object and attaches `zt_splice` to them.
    pub(super) fn attach(ebpf: &mut Ebpf) -> Result<Self, CaptureError> {
        let mut map = |name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::Map {
                map: name,
                source: aya::maps::MapError::InvalidName {
                    name: name.to_owned(),
                },
            })
        };
        let convert = |name: &'static str| move |source| CaptureError::Map { map: name, source };
        let sources = SockHash::try_from(map(map_names::SPLICE_SOURCES)?)
            .map_err(convert(map_names::SPLICE_SOURCES))?;
        let targets = SockHash::try_from(map(map_names::SPLICE_TARGETS)?)
            .map_err(convert(map_names::SPLICE_TARGETS))?;
        let links = HashMap::try_from(map(map_names::SPLICE_LINKS)?)
            .map_err(convert(map_names::SPLICE_LINKS))?;
        let program: &mut SkSkb = super::loader::program_mut(ebpf, PROGRAM)?;
        let err = |source| CaptureError::Program {
            program: PROGRAM,
            source,
        };
        program.load().map_err(err)?;
        // The link lives in the program, which lives as long as the agent's object.
        program.attach(sources.fd()).map_err(err)?;
        Ok(Self(Arc::new(Mutex::new(Maps {
            sources,
            targets,
            links,
        }))))
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Splices `a` and `b`, two established TCP sockets of the agent: from now on the kernel
    /// sends what either receives out of the other, starting with what is queued already, in
    /// order. The splice ends when the returned value drops (and when a socket closes).
    pub fn splice(&self, a: &impl AsRawFd, b: &impl AsRawFd) -> io::Result<Splice> {
        let cookies = [socket_cookie(a)?, socket_cookie(b)?];
        let splice = Splice {
            splicer: self.clone(),
            cookies,
        };
        let map_err = |map: &'static str| move |e| io::Error::other(format!("{map}: {e}"));
        {
            let mut maps = self.maps();
            for (own, peer) in [(cookies[0], cookies[1]), (cookies[1], cookies[0])] {
                let link = SpliceLink { peer, bytes: 0 };
                maps.links
                    .insert(&own, &link, 0)
                    .map_err(map_err(map_names::SPLICE_LINKS))?;
            }
            // Targets first: a socket's program may redirect only to a peer that is there.
            // Until a socket is in SOURCES what it receives queues as usual.
            for (cookie, fd) in [(cookies[0], a.as_raw_fd()), (cookies[1], b.as_raw_fd())] {
                maps.targets
                    .insert(&cookie, fd, 0)
                    .map_err(map_err(map_names::SPLICE_TARGETS))?;
            }
            for (cookie, fd) in [(cookies[0], a.as_raw_fd()), (cookies[1], b.as_raw_fd())] {
                maps.sources
                    .insert(&cookie, fd, 0)
                    .map_err(map_err(map_names::SPLICE_SOURCES))?;
            }
        }
        // Bytes that arrived before the program was attached wait in the receive queue until
        // the next segment wakes it; setting SO_RCVLOWAT wakes it now, so they go first.
        for fd in [a.as_raw_fd(), b.as_raw_fd()] {
            set_rcvlowat(fd)?;
        }
        Ok(splice)
    }
}

fn set_rcvlowat(fd: i32) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid fd, pointer and length for an int option.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One spliced connection. Dropping it removes its links; the sockets leave the maps when they
/// close.
pub struct Splice {
    splicer: Splicer,
    cookies: [u64; 2],
}

impl Splice {
    /// Bytes the kernel moved so far: [from `a` to `b`, from `b` to `a`].
    pub fn forwarded(&self) -> [u64; 2] {
        let maps = self.splicer.maps();
        self.cookies
            .map(|c| maps.links.get(&c, 0).map_or(0, |link| link.bytes))
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        let mut maps = self.splicer.maps();
        for cookie in self.cookies {
            let _ = maps.sources.remove(&cookie);
            let _ = maps.targets.remove(&cookie);
            let _ = maps.links.remove(&cookie);
        }
    }
}
