//! One netlink request and its replies, in the calling thread's network namespace (a netlink
//! socket belongs to the namespace of the thread that opens it, so entering a pod's namespace
//! first asks that pod's kernel state). Blocking (up to the receive timeout): callers run it off
//! the runtime.
use std::{io, time::Duration};

use netlink_packet_core::{
    NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// Sends `request` with `flags` (besides `NLM_F_REQUEST`) on a new socket of `protocol` and
/// hands each message of the reply to `each`, until the kernel ends it: a dump's end, or an
/// acknowledgement (so a request that is not a dump must ask for one, `NLM_F_ACK`). An error
/// reply is the error; a dump the kernel marks inconsistent (it changed meanwhile) is
/// `Interrupted`, to be asked again; a kernel that does not answer within 5 s, `WouldBlock`.
pub(super) fn exchange<Request, Reply>(
    protocol: isize,
    request: Request,
    flags: u16,
    mut each: impl FnMut(Reply),
) -> io::Result<()>
where
    Request: NetlinkSerializable,
    Reply: NetlinkDeserializable,
{
    let mut socket = Socket::new(protocol)?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut message = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(request),
    );
    message.header.flags = NLM_F_REQUEST | flags;
    message.header.sequence_number = 1;
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;

    loop {
        let (data, _) = socket.recv_from_full()?;
        if data.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "netlink reply ended early",
            ));
        }
        let mut offset = 0;
        while offset < data.len() {
            let message = NetlinkMessage::<Reply>::deserialize(&data[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            if message.header.flags & NLM_F_DUMP_INTR != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "netlink dump interrupted by a change",
                ));
            }
            match message.payload {
                NetlinkPayload::Done(done) if done.code < 0 => {
                    return Err(io::Error::from_raw_os_error(-done.code));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                // An error message without a code is the acknowledgement.
                NetlinkPayload::Error(_) => return Ok(()),
                NetlinkPayload::InnerMessage(reply) => each(reply),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}
