//! Bandwidth limits: a token bucket per direction, so that one machine can emulate a home or
//! datacenter link (`tessera contribute --max-upload-mbps / --max-download-mbps`). The client
//! reads every body it downloads through the download link and sends submissions through the
//! upload link.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// At most `rate` bytes per second on average, in bursts of at most `burst` bytes.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

/// A bucket shared by every transfer in one direction.
pub type Link = Arc<Mutex<Bucket>>;

impl Bucket {
    /// A bucket passing `bytes_per_s` (> 0); bursts of a twentieth of a second, at least 16 KiB.
    pub fn new(bytes_per_s: f64) -> Bucket {
        let rate = bytes_per_s.max(1.0);
        let burst = (rate / 20.0).max(16.0 * 1024.0);
        Bucket { rate, burst, tokens: burst, at: Instant::now() }
    }

    pub fn shared(bytes_per_s: f64) -> Link {
        Arc::new(Mutex::new(Bucket::new(bytes_per_s)))
    }

    /// The largest piece worth asking for at once.
    pub fn chunk(&self) -> usize {
        self.burst as usize
    }

    /// Blocks until `n` bytes may pass.
    pub fn take(&mut self, n: usize) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / self.rate));
            self.tokens = 0.0;
            self.at = Instant::now();
        }
    }
}

/// Takes `n` bytes from `link`, if there is one.
pub fn pass(link: Option<&Link>, n: usize) {
    if let Some(l) = link
        && let Ok(mut b) = l.lock()
    {
        b.take(n);
    }
}

/// The largest piece to move at once through `link` (64 KiB without one).
pub fn chunk(link: Option<&Link>) -> usize {
    link.and_then(|l| l.lock().ok().map(|b| b.chunk())).unwrap_or(64 * 1024)
}

/// A body that reports how much of it has been read (sent), no faster than the link allows.
pub(crate) struct Counted {
    bytes: Arc<Vec<u8>>,
    at: usize,
    end: usize,
    progress: Option<crate::UploadProgress>,
    link: Option<Link>,
}

impl Counted {
    pub(crate) fn new(bytes: Arc<Vec<u8>>, progress: Option<crate::UploadProgress>, link: Option<Link>) -> Counted {
        let end = bytes.len();
        Counted::range(bytes, 0..end, progress, link)
    }

    /// Bytes `range` of `bytes` (one part of an upload); progress counts from the whole's start.
    pub(crate) fn range(
        bytes: Arc<Vec<u8>>,
        range: std::ops::Range<usize>,
        progress: Option<crate::UploadProgress>,
        link: Option<Link>,
    ) -> Counted {
        let end = range.end.min(bytes.len());
        Counted { bytes, at: range.start.min(end), end, progress, link }
    }
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.end - self.at).min(chunk(self.link.as_ref()));
        pass(self.link.as_ref(), n);
        buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        if let Some(p) = &self.progress {
            p(self.at as u64, self.bytes.len() as u64);
        }
        Ok(n)
    }
}

/// Reads all of `r`, no faster than `link` allows.
pub fn read_all(mut r: impl Read, link: Option<&Link>) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk(link)];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        pass(link, n);
        out.extend_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MB through a 2 MB/s link takes at least the time the rate allows (less one burst).
    #[test]
    fn a_limited_link_takes_at_least_its_time() {
        let link = Bucket::shared(2_000_000.0);
        let data = vec![7u8; 1_000_000];
        let start = Instant::now();
        let read = read_all(&data[..], Some(&link)).unwrap();
        let took = start.elapsed().as_secs_f64();
        assert_eq!(read, data);
        let burst = link.lock().unwrap().chunk() as f64;
        assert!(took >= (1_000_000.0 - burst) / 2_000_000.0 * 0.95, "1 MB at 2 MB/s took only {took:.3} s");
        // Without a link nothing waits.
        assert_eq!(read_all(&data[..], None).unwrap().len(), data.len());
    }
}
