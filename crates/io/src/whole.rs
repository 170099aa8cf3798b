//! Whole-window reads and writes out of positional requests that may come back short: the
//! loops of the io_uring backends (a short count, or EINTR, asks for the rest).

use crate::{BufResult, IoBuf};
use std::future::Future;
use std::io;

/// Reads the buffer's window from `offset` with `op` (one positional read of the window it
/// is handed, returning the count), asking again for the rest after a short count, until the
/// window is full or the file ends. With O_DIRECT (`direct_align`) an unaligned count is the
/// end of the file (reading on from there would fail), and the rest of the window is zeroed:
/// the kernel may have written past the count. The window is restored.
pub(crate) async fn read_whole<F, Fut>(
    mut buf: IoBuf,
    offset: u64,
    direct_align: Option<usize>,
    mut op: F,
) -> BufResult<usize>
where
    F: FnMut(IoBuf, u64) -> Fut,
    Fut: Future<Output = BufResult<usize>>,
{
    let win = buf.window();
    let mut done = 0;
    let res = loop {
        if done == win.len() {
            break Ok(done);
        }
        buf.set_window(win.start + done..win.end);
        let (r, b) = op(buf, offset + done as u64).await;
        buf = b;
        match r {
            Ok(0) => break Ok(done),
            Ok(n) => {
                done += n;
                if direct_align.is_some_and(|a| n % a != 0) {
                    break Ok(done);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    buf.set_window(win);
    if let (Some(_), Ok(n)) = (direct_align, &res) {
        buf[*n..].fill(0);
    }
    (res, buf)
}

/// Writes the whole window at `offset` with `op` (one positional write of the window it is
/// handed, returning the count), asking again for the rest after a short count. The window
/// is restored.
pub(crate) async fn write_whole<F, Fut>(mut buf: IoBuf, offset: u64, mut op: F) -> BufResult<()>
where
    F: FnMut(IoBuf, u64) -> Fut,
    Fut: Future<Output = BufResult<usize>>,
{
    let win = buf.window();
    let mut done = 0;
    let res = loop {
        if done == win.len() {
            break Ok(());
        }
        buf.set_window(win.start + done..win.end);
        let (r, b) = op(buf, offset + done as u64).await;
        buf = b;
        match r {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    buf.set_window(win);
    (res, buf)
}
