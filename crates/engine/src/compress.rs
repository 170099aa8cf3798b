//! Decompression of compressed clusters (raw deflate and zstd), as QEMU does it: the output
//! must fill exactly one cluster; bytes after the end of the stream are ignored (the tail of
//! the last sector may hold the start of another compressed cluster).

use qcow2_format::CompressionType;

/// Decompresses `input` into `out`, which must come out completely filled.
pub(crate) fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match ty {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
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
