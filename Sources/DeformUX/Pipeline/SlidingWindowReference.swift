#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The naive twin of `SlidingWindowInference` (STYLE.md habit 3), the oracle of its tests: MONAI's
/// `sliding_window_inference` transcribed literally, in full memory. It pads the image into a new array
/// when the window is larger, computes the scan interval and the window starts its own way (a literal
/// transcription of MONAI's loops), runs the windows one at a time, keeps the whole Cout x volume of
/// weighted sums and the whole weight map, divides, crops. Same float32 arithmetic per voxel (windows
/// in the same order, product then sum, the 8 flips summed in the same order and scaled by 1/8), so the
/// streaming version must agree with it to the bit.
public enum SlidingWindowReference {
    /// The blended logits (outChannels x size, C order) and the summed weights (size); voxels no run
    /// window covered have weight 0 and logits 0.
    public static func blend(_ predictor: any WindowPredictor, input: [Float], size: SIMD3<Int>,
                             options: SlidingWindowOptions) throws -> (logits: [Float], weights: [Float]) {
        try SlidingWindowInference.validate(predictor, options, "sliding window reference")
        _ = try SlidingWindowPlan(imageSize: size, window: options.window, overlap: options.overlap)
        let cin = predictor.inChannels, cout = predictor.outChannels
        let w = options.window
        let n = size.x * size.y * size.z
        guard input.count == cin * n else {
            throw DeformUXError.shapeMismatch("sliding window reference", "input size", expected: "\(cin * n)", got: "\(input.count)")
        }
        // Pad to at least the window: (w - n) // 2 before.
        var ps = SIMD3<Int>(), before = SIMD3<Int>()
        for a in 0..<3 {
            ps[a] = max(size[a], w[a])
            before[a] = max(w[a] - size[a], 0) / 2
        }
        let pn = ps.x * ps.y * ps.z
        var padded = [Float](repeating: options.padValue, count: cin * pn)
        for c in 0..<cin {
            for x in 0..<size.x {
                for y in 0..<size.y {
                    for z in 0..<size.z {
                        padded[c * pn + ((x + before.x) * ps.y + y + before.y) * ps.z + z + before.z] =
                            input[c * n + (x * size.y + y) * size.z + z]
                    }
                }
            }
        }
        // MONAI's _get_scan_interval and dense_patch_slices, literally.
        var scanInterval = [Int]()
        for a in 0..<3 {
            if w[a] == ps[a] {
                scanInterval.append(w[a])
            } else {
                let interval = Int(Double(w[a]) * (1 - options.overlap))
                scanInterval.append(interval > 0 ? interval : 1)
            }
        }
        var axisStarts: [[Int]] = []
        for a in 0..<3 {
            let num = Int((Double(ps[a]) / Double(scanInterval[a])).rounded(.up))
            var scanDim: Int?
            for d in 0..<num where d * scanInterval[a] + w[a] >= ps[a] { scanDim = d; break }
            let count = scanDim.map { $0 + 1 } ?? 1
            axisStarts.append((0..<count).map { idx in
                var s = idx * scanInterval[a]
                s -= max(s + w[a] - ps[a], 0)
                return s
            })
        }
        let importance = try ImportanceMap.make(window: w, mode: options.blend)
        let wn = w.x * w.y * w.z
        var output = [Float](repeating: 0, count: cout * pn)
        var count = [Float](repeating: 0, count: pn)
        var window = [Float](repeating: 0, count: cin * wn)
        var logits = [Float](repeating: 0, count: cout * wn)
        for sx in axisStarts[0] {
            for sy in axisStarts[1] {
                for sz in axisStarts[2] {
                    for c in 0..<cin {
                        for i in 0..<w.x {
                            for j in 0..<w.y {
                                for k in 0..<w.z {
                                    window[((c * w.x + i) * w.y + j) * w.z + k] =
                                        padded[c * pn + ((sx + i) * ps.y + sy + j) * ps.z + sz + k]
                                }
                            }
                        }
                    }
                    if let t = options.skipThreshold {
                        // Voxels of the window that count: all, or those inside the data box (image
                        // coordinates: padded index - before).
                        var background = true
                        for c in 0..<cin {
                            for i in 0..<wn where window[c * wn + i] > t[c] {
                                if let box = options.dataBox {
                                    let v = SIMD3(sx + i / (w.y * w.z), sy + (i / w.z) % w.y, sz + i % w.z) &- before
                                    let inside = (0..<3).allSatisfy { v[$0] >= box.origin[$0] && v[$0] < box.origin[$0] + box.size[$0] }
                                    if !inside { continue }
                                }
                                background = false
                            }
                        }
                        if background { continue }
                    }
                    logits = try predict(predictor, window, w, tta: options.flipTTA)
                    for c in 0..<cout {
                        for i in 0..<w.x {
                            for j in 0..<w.y {
                                for k in 0..<w.z {
                                    let l = (i * w.y + j) * w.z + k
                                    let p = ((sx + i) * ps.y + sy + j) * ps.z + sz + k
                                    output[c * pn + p] += logits[c * wn + l] * importance[l]
                                    if c == 0 { count[p] += importance[l] }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Divide and crop.
        var blended = [Float](repeating: 0, count: cout * n)
        var weights = [Float](repeating: 0, count: n)
        for x in 0..<size.x {
            for y in 0..<size.y {
                for z in 0..<size.z {
                    let p = ((x + before.x) * ps.y + y + before.y) * ps.z + z + before.z
                    let q = (x * size.y + y) * size.z + z
                    weights[q] = count[p]
                    for c in 0..<cout { blended[c * n + q] = count[p] > 0 ? output[c * pn + p] / count[p] : 0 }
                }
            }
        }
        return (blended, weights)
    }

    /// One window's logits, or with `tta` the average over the 8 flip combinations (flip k: bit 2 x,
    /// bit 1 y, bit 0 z), summed in k order and scaled by 1/8.
    static func predict(_ predictor: any WindowPredictor, _ window: [Float], _ w: SIMD3<Int>, tta: Bool) throws -> [Float] {
        let cin = predictor.inChannels, cout = predictor.outChannels
        let wn = w.x * w.y * w.z
        func run(_ x: [Float]) throws -> [Float] {
            var out = [Float](repeating: 0, count: cout * wn)
            try x.withUnsafeBufferPointer { xp in
                try out.withUnsafeMutableBufferPointer { op in
                    try predictor.predict(windows: xp.baseAddress!, batch: 1, size: w, into: op.baseAddress!)
                }
            }
            return out
        }
        guard tta else { return try run(window) }
        func flip(_ a: [Float], _ channels: Int, _ k: Int) -> [Float] {
            var b = a
            for c in 0..<channels {
                for i in 0..<w.x {
                    for j in 0..<w.y {
                        for l in 0..<w.z {
                            let si = k & 4 != 0 ? w.x - 1 - i : i
                            let sj = k & 2 != 0 ? w.y - 1 - j : j
                            let sl = k & 1 != 0 ? w.z - 1 - l : l
                            b[c * wn + (i * w.y + j) * w.z + l] = a[c * wn + (si * w.y + sj) * w.z + sl]
                        }
                    }
                }
            }
            return b
        }
        var sum = [Float](repeating: 0, count: cout * wn)
        for k in 0..<8 {
            let y = flip(try run(flip(window, cin, k)), cout, k)
            for i in 0..<sum.count { sum[i] += y[i] }
        }
        return sum.map { $0 * 0.125 }
    }

    /// argmax over classes per voxel (first maximum), 0 where the weight is 0.
    public static func labels(logits: [Float], weights: [Float], classes: Int) throws -> [UInt8] {
        let n = weights.count
        try check(logits, weights, classes)
        return (0..<n).map { q in
            guard weights[q] > 0 else { return 0 }
            var best = 0
            for c in 1..<max(classes, 1) where logits[c * n + q] > logits[best * n + q] { best = c }
            return UInt8(best)
        }
    }

    /// Softmax over classes per voxel (max subtracted, float32 expf, summed in class order), one-hot
    /// background where the weight is 0.
    public static func probabilities(logits: [Float], weights: [Float], classes: Int) throws -> [Float] {
        let n = weights.count
        try check(logits, weights, classes)
        var p = [Float](repeating: 0, count: classes * n)
        for q in 0..<n {
            guard weights[q] > 0 else { p[q] = 1; continue }
            var m = -Float.infinity
            for c in 0..<classes { m = max(m, logits[c * n + q]) }
            var s: Float = 0
            for c in 0..<classes {
                let e = expf(logits[c * n + q] - m)
                p[c * n + q] = e
                s += e
            }
            for c in 0..<classes { p[c * n + q] /= s }
        }
        return p
    }

    private static func check(_ logits: [Float], _ weights: [Float], _ classes: Int) throws {
        guard classes >= 1, classes <= 256, logits.count == classes * weights.count else {
            throw DeformUXError.shapeMismatch("sliding window reference", "logits do not fit the weights",
                                              expected: "1...256 classes x \(weights.count) values",
                                              got: "\(logits.count) values for \(classes) classes")
        }
    }
}
