//! What the tests of both sides read of a connection from the kernel.

use std::os::fd::AsRawFd;

/// How many TCP segments carrying data `socket` has received: how many
/// writes of small messages its peer made.
pub fn data_segments_in(socket: &impl AsRawFd) -> u32 {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` has room for `len` bytes, which the call fills.
    #[allow(unsafe_code)]
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(result, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    // SAFETY: zeroed, then filled by the kernel.
    #[allow(unsafe_code)]
    unsafe { info.assume_init() }.tcpi_data_segs_in
}
