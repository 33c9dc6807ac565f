/// Postprocessing: everything the preprocessing did, undone, so that labels land exactly on the input
/// grid with the input affine; then, optionally, the largest connected component per class.
///
/// Labels (computed on the network's grid by the streaming argmax) go back by: cropping the padding,
/// nearest ("nearest-exact") resampling to the canonical grid, and writing through the reoriented view
/// of the output (the inverse permutation and flips). Nothing is interpolated except by the resampling
/// step, so without resampling the labels are the network grid's labels moved voxel for voxel; with
/// it, each input voxel takes the label of the network voxel whose centre is nearest (exact for whole
/// resampling factors). nnU-Net instead resamples the probabilities back and takes the argmax there;
/// that needs Cout floats per input voxel, which the bounded-memory path does not hold.
/// Probabilities (when asked) go back the same way with trilinear resampling, so they still sum to 1.
extension Preprocessing {
    /// Network-grid labels (`networkSize`) back on the input grid, with the input affine.
    public func restore(_ labels: LabelMap) throws -> LabelMap {
        guard labels.size == networkSize else {
            throw DeformUXError.shapeMismatch("restore", "label map is not on the network grid",
                                              expected: sizeText(networkSize), got: sizeText(labels.size))
        }
        var out = [UInt8](repeating: 0, count: inputSize.x * inputSize.y * inputSize.z)
        labels.labels.withUnsafeBufferPointer { s in
            out.withUnsafeMutableBufferPointer { o in
                restoreLabels(s.baseAddress!, into: o.baseAddress!)
            }
        }
        return try LabelMap(size: inputSize, labels: out, affine: inputAffine)
    }

    /// A network-grid volume (e.g. probabilities, any channel count) back on the input grid, trilinear.
    public func restore(_ volume: Volume) throws -> Volume {
        guard volume.size == networkSize else {
            throw DeformUXError.shapeMismatch("restore", "volume is not on the network grid",
                                              expected: sizeText(networkSize), got: sizeText(volume.size))
        }
        let out = try Volume(uninitialized: inputSize, channels: volume.channels, affine: inputAffine)
        let n = networkSize.x * networkSize.y * networkSize.z, m = inputSize.x * inputSize.y * inputSize.z
        for c in 0..<volume.channels { restoreChannel(volume.pointer + c * n, into: out.pointer + c * m) }
        return out
    }

    /// net: networkSize labels; out: inputSize labels.
    func restoreLabels(_ net: UnsafePointer<UInt8>, into out: UnsafeMutablePointer<UInt8>) {
        let src = padding.interior(of: Grid(contiguous: UnsafeMutablePointer(mutating: net), size: networkSize))
        let dst = reorientation.canonicalView(of: Grid(contiguous: out, size: inputSize))
        resampleNearest(src, dst)
    }

    /// One channel: net networkSize floats -> out inputSize floats.
    func restoreChannel(_ net: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>) {
        let src = padding.interior(of: Grid(contiguous: UnsafeMutablePointer(mutating: net), size: networkSize))
        let dst = reorientation.canonicalView(of: Grid(contiguous: out, size: inputSize))
        resampleLinear(src, dst)
    }
}

/// Keeps, for every label > 0, only its largest connected component (26-connectivity: voxels touching
/// by a face, an edge or a corner), as MONAI's `KeepLargestConnectedComponent` does with its defaults
/// (every non-zero label, independently, full connectivity); the other voxels of that label become 0.
/// Between components of equal size, the one whose first voxel comes first in C order is kept (MONAI
/// leaves ties to its sort).
public final class LargestComponent {
    /// One bit per voxel: visited (first pass), then kept (second pass).
    private var bits: [UInt64] = []
    /// The flood fill's stack of voxel indices.
    private var stack: [Int] = []

    public init() {}

    /// Bytes held between calls.
    public var retainedBytes: Int { bits.capacity * 8 + stack.capacity * 8 }

    public func release() {
        bits = []
        stack = []
    }

    /// Applies the filter to a label map in place.
    public func apply(_ labels: inout LabelMap) {
        let size = labels.size
        labels.labels.withUnsafeMutableBufferPointer { apply($0.baseAddress!, size: size) }
    }

    /// labels: X x Y x Z, C order, modified in place.
    func apply(_ labels: UnsafeMutablePointer<UInt8>, size: SIMD3<Int>) {
        let n = size.x * size.y * size.z
        let words = (n + 63) / 64
        if bits.count < words { bits = [UInt64](repeating: 0, count: words) }
        bits.withUnsafeMutableBufferPointer { b in
            let bits = b.baseAddress!
            bits.update(repeating: 0, count: words)
            // Pass 1: every component, its size; per label the largest (first in C order on ties).
            var bestSize = [Int](repeating: 0, count: 256)
            var bestStart = [Int](repeating: -1, count: 256)
            for i in 0..<n where labels[i] != 0 && !test(bits, i) {
                let s = fill(labels, size, bits, from: i)
                let l = Int(labels[i])
                if s > bestSize[l] { bestSize[l] = s; bestStart[l] = i }
            }
            // Pass 2: mark the kept components.
            bits.update(repeating: 0, count: words)
            for l in 1..<256 where bestStart[l] >= 0 { _ = fill(labels, size, bits, from: bestStart[l]) }
            // Pass 3: everything else becomes background.
            for i in 0..<n where labels[i] != 0 && !test(bits, i) { labels[i] = 0 }
        }
    }

    @inline(__always) private func test(_ bits: UnsafeMutablePointer<UInt64>, _ i: Int) -> Bool {
        bits[i >> 6] & (1 << UInt64(i & 63)) != 0
    }

    @inline(__always) private func set(_ bits: UnsafeMutablePointer<UInt64>, _ i: Int) {
        bits[i >> 6] |= 1 << UInt64(i & 63)
    }

    /// Marks the 26-connected component of `start` (voxels with its label) and returns its size.
    private func fill(_ labels: UnsafeMutablePointer<UInt8>, _ size: SIMD3<Int>, _ bits: UnsafeMutablePointer<UInt64>,
                      from start: Int) -> Int {
        let l = labels[start]
        let Y = size.y, Z = size.z
        stack.removeAll(keepingCapacity: true)
        stack.append(start)
        set(bits, start)
        var count = 0
        while let i = stack.popLast() {
            count += 1
            let x = i / (Y * Z), y = (i / Z) % Y, z = i % Z
            for nx in max(x - 1, 0)...min(x + 1, size.x - 1) {
                for ny in max(y - 1, 0)...min(y + 1, Y - 1) {
                    for nz in max(z - 1, 0)...min(z + 1, Z - 1) {
                        let j = (nx * Y + ny) * Z + nz
                        if labels[j] == l && !test(bits, j) {
                            set(bits, j)
                            stack.append(j)
                        }
                    }
                }
            }
        }
        return count
    }
}
