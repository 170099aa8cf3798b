//! Compression and decompression of compressed clusters (raw deflate and zstd), as QEMU
//! does it. Decompression must fill exactly one cluster; bytes after the end of the stream
//! are ignored (the tail of the last sector may hold the start of another compressed
//! cluster). Compression makes what QEMU's `qcow2_compress` makes: zlib as raw deflate with
//! a 4 KiB window (`windowBits` -12) at the default level, zstd as one frame at the default
//! level; an output that does not fit the limit given is no output (the caller writes the
//! cluster uncompressed).

use qcow2_format::CompressionType;

/// Decompresses `input` into `out`, which must come out completely filled.
pub(crate) fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match ty {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

/// Compresses `input` (one cluster) into at most `limit` bytes; `None` when it does not fit.
pub(crate) fn compress(
    ty: CompressionType,
    input: &[u8],
    limit: usize,
) -> Result<Option<Vec<u8>>, String> {
    match ty {
        CompressionType::Zlib => deflate(input, limit),
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(input, 0).map_err(|e| format!("zstd: {e}"))?;
            Ok((out.len() <= limit).then_some(out))
        }
    }
}

fn deflate(input: &[u8], limit: usize) -> Result<Option<Vec<u8>>, String> {
    let mut c = flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
    let mut out = Vec::with_capacity(limit);
    match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) => Ok(Some(out)),
        // Out of room before the end of the stream: it does not pay.
        Ok(_) => Ok(None),
        Err(e) => Err(format!("deflate: {e}")),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    // Raw deflate. A 32 KiB window decodes every stream a 4 KiB-window encoder makes.
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
        Ok(status) => Err(format!(
            "deflate stream produced {} of {} bytes ({status:?})",
            d.total_out(),
            out.len()
        )),
        Err(e) if d.total_out() == out.len() as u64 => {
            // The output is full; whatever follows (the next cluster's data) is not ours.
            let _ = e;
            Ok(())
        }
        Err(e) => Err(format!("deflate: {e}")),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, Operation};
    let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    let (mut inp, mut outp) = (0usize, 0usize);
    while outp < out.len() {
        let st = d
            .run_on_buffers(&input[inp..], &mut out[outp..])
            .map_err(|e| format!("zstd: {e}"))?;
        inp += st.bytes_read;
        outp += st.bytes_written;
        if st.bytes_read == 0 && st.bytes_written == 0 {
            return Err(format!(
                "zstd stream produced {outp} of {} bytes",
                out.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 7 % 251) as u8).collect()
    }

    #[test]
    fn compression_round_trips_and_gives_up_when_it_does_not_pay() {
        let data = sample();
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(ty, &data, data.len() - 1).unwrap().unwrap();
            assert!(c.len() < data.len() / 2, "{ty:?}: {}", c.len());
            let mut out = vec![0; data.len()];
            decompress(ty, &c, &mut out).unwrap();
            assert_eq!(out, data);
            // Too little room: no output.
            assert_eq!(compress(ty, &data, 10).unwrap(), None);
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let noise: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 32) as u8
                })
                .collect();
            assert_eq!(compress(ty, &noise, noise.len() - 1).unwrap(), None);
        }
    }

    #[test]
    fn raw_deflate_with_trailing_garbage() {
        let data = sample();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut stream = enc.finish().unwrap();
        stream.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let mut out = vec![0; data.len()];
        decompress(CompressionType::Zlib, &stream, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_deflate_stream_is_an_error() {
        let data = sample();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data[..1000]).unwrap();
        let stream = enc.finish().unwrap();
        let mut out = vec![0; data.len()];
        assert!(decompress(CompressionType::Zlib, &stream, &mut out).is_err());
    }

    #[test]
    fn zstd_frame_followed_by_another() {
        let data = sample();
        let mut stream = zstd::bulk::compress(&data, 0).unwrap();
        stream.extend(zstd::bulk::compress(&[1u8; 4096], 0).unwrap());
        let mut out = vec![0; data.len()];
        decompress(CompressionType::Zstd, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        let mut out = vec![0; data.len()];
        assert!(decompress(CompressionType::Zstd, &stream[..20], &mut out).is_err());
    }
}
