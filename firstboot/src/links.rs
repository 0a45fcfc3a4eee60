//! Bringing links up through rtnetlink: one RTM_NEWLINK request per link with IFF_UP set in
//! `ifi_flags`/`ifi_change`, acknowledged by the kernel (NLM_F_ACK). A raw NETLINK_ROUTE
//! socket is all it takes, so no async runtime is pulled in for it.

use std::io;

const RTM_NEWLINK: u16 = 16;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// The RTM_NEWLINK request that sets IFF_UP on link `ifindex`.
pub fn link_up_request(ifindex: u32, seq: u32) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + IFINFOMSG_LEN) as u32;
    let mut m = Vec::with_capacity(len as usize);
    // struct nlmsghdr
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifinfomsg
    m.push(libc::AF_UNSPEC as u8);
    m.push(0);
    m.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    m.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    m.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // ifi_flags
    m.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // ifi_change
    m
}

/// The errno of an NLMSG_ERROR ack for `seq` (0 = success); `None` for other messages.
pub fn parse_ack(buf: &[u8], seq: u32) -> Option<i32> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?);
        let s = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().ok()?);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return None;
        }
        if ty == NLMSG_ERROR && s == seq && len >= NLMSG_HDRLEN + 4 {
            let e = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().ok()?);
            return Some(-e);
        }
        off += (len + 3) & !3;
    }
    None
}

struct Fd(i32);
impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the fd came from socket(2) and is closed once.
        unsafe { libc::close(self.0) };
    }
}

pub fn links_up(names: &[String]) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is owned by `Fd`.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = Fd(fd);
    let mut first_err = None;
    for (i, name) in names.iter().enumerate() {
        if let Err(e) = link_up(fd.0, name, i as u32 + 1) {
            tracing::warn!("cannot bring {name} up: {e}");
            first_err.get_or_insert(io::Error::new(e.kind(), format!("{name}: {e}")));
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn link_up(fd: i32, name: &str, seq: u32) -> io::Result<()> {
    let idx = nix::net::if_::if_nametoindex(name).map_err(io::Error::from)?;
    let req = link_up_request(idx, seq);
    // SAFETY: sockaddr_nl is plain data; the kernel is nl_pid 0. Buffers outlive the calls.
    unsafe {
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        let r = libc::sendto(
            fd,
            req.as_ptr() as *const libc::c_void,
            req.len(),
            0,
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 8192];
        loop {
            let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            match parse_ack(&buf[..n as usize], seq) {
                Some(0) => return Ok(()),
                Some(e) => return Err(io::Error::from_raw_os_error(e)),
                None => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = link_up_request(3, 7);
        assert_eq!(m.len(), 32);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWLINK);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 5);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 3);
        assert_eq!(u32::from_ne_bytes(m[24..28].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(m[28..32].try_into().unwrap()), 1);
    }

    #[test]
    fn ack_parsing() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&9u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        assert_eq!(parse_ack(&ack, 9), Some(libc::EPERM));
        assert_eq!(parse_ack(&ack, 8), None);
        ack[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(parse_ack(&ack, 9), Some(0));
        assert_eq!(parse_ack(&ack[..10], 9), None);
    }

    #[test]
    fn unknown_link_is_an_error() {
        let e = links_up(&["nosuchlink0".into()]).unwrap_err();
        assert!(e.to_string().starts_with("nosuchlink0: "), "{e}");
    }

    /// Needs CAP_NET_ADMIN; on an up `lo` it is a no-op that the kernel acks.
    #[test]
    #[ignore]
    fn real_lo_up() {
        links_up(&["lo".into()]).unwrap();
    }
}
