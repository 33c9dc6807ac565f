import COpenBLAS

/// A logical row-major matrix for sgemm: the memory at `pointer` with leading dimension `ld`, read
/// as itself or (when `transposed`) as its transpose.
struct GemmOperand {
    var pointer: UnsafeMutablePointer<Float>
    var ld: Int
    var transposed: Bool

    var t: GemmOperand { GemmOperand(pointer: pointer, ld: ld, transposed: !transposed) }
}

/// c = alpha * a . b + beta * c, with logical sizes m x k, k x n and m x n (single-threaded OpenBLAS).
/// An output stored transposed is computed as c^T = b^T . a^T.
func gemm(m: Int, n: Int, k: Int, alpha: Float = 1, a: GemmOperand, b: GemmOperand, beta: Float, c: GemmOperand) {
    if m == 0 || n == 0 { return }
    if c.transposed {
        gemm(m: n, n: m, k: k, alpha: alpha, a: b.t, b: a.t, beta: beta, c: c.t)
        return
    }
    cblas_sgemm(CblasRowMajor, a.transposed ? CblasTrans : CblasNoTrans, b.transposed ? CblasTrans : CblasNoTrans,
                Int32(m), Int32(n), Int32(k), alpha, a.pointer, Int32(a.ld), b.pointer, Int32(b.ld),
                beta, c.pointer, Int32(c.ld))
}
