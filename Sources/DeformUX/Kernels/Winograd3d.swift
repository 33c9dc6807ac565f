/// The 3x3x3 stride-1 padding-1 convolution by Winograd's minimal filtering F(2x2x2, 3x3x3): the same
/// operator as `Conv3d.Direct` (which it serves: the forward, the input gradient and the weight
/// gradient of the big high-resolution convs), with 64 instead of 216 multiply-adds per (2x2x2 output
/// tile, input channel, output channel).
///
/// In one dimension, with the correlation y[i] = sum_k g[k] d[i + k] (i = 0, 1; d of 4 inputs):
///
///     V = B^T d:  v0 = d0 - d2,  v1 = d1 + d2,  v2 = d2 - d1,  v3 = d1 - d3
///     U = G g:    u0 = g0,       u1 = (g0 + g1 + g2) / 2,  u2 = (g0 - g1 + g2) / 2,  u3 = g2
///     y = A^T m:  y0 = m0 + m1 + m2,  y1 = m1 - m2 - m3,   with m = U * V elementwise
///
/// applied along d, h and w. A tile of 2x2x2 outputs reads a 4x4x4 patch of the padded input; in the
/// transformed domain the conv becomes 64 independent products M[xi] (tiles x Cout) = V[xi] (tiles x
/// Cin) . U[xi] (Cin x Cout), which the direct kernel's register tiles (`tile8x48`, or `tile24x16` for
/// convs with at most 16 outputs; one "tap") compute.
///
/// Work: threads own runs of output plane pairs; a pair needs 4 padded input planes (a ring, filled
/// by `Direct.fillPlane`, so two sources and the fused input transform work as in the direct path).
/// A pair's tiles go in chunks whose transformed inputs stay in L2; per chunk and block of output
/// channels (the direct kernel's: 48 wide, or 16 for convs with at most 16 outputs), the 64 products, then the output transform writes y through `Direct.write`
/// (bias, accumulate, the two-output split). Every output element is computed by one part in a
/// fixed order, so results do not depend on the thread count. Rounding differs from the direct sum
/// (the transforms add and halve): errors stay at a few float32 ulps of the sums (tested against the
/// direct kernel and the reference).
extension Conv3d {
    enum Winograd {
        /// Whether the Winograd path serves a direct 3x3x3 conv of shape `s`: even H and W (tiles
        /// cover the plane exactly), planes of at least 8x8, input channels a multiple of 16 and at most
        /// 192 (a block's transformed weight, 64 x Cin x 48 floats, stays within L2/L3 reach; the wide
        /// low-resolution convs keep the direct kernel).
        static func applies(_ s: Shape) -> Bool {
            s.path == .direct3x3x3 && s.h % 2 == 0 && s.w % 2 == 0 && s.h >= 8 && s.w >= 8 && s.d >= 2
                && s.cin % 16 == 0 && s.cin <= 192
        }

        /// Tiles per chunk: the chunk's transformed input (64 x tiles x Cin floats) stays in L2; a
        /// multiple of the register tile's (8 tiles, or 24 for 16-wide blocks).
        static func chunkTiles(cin: Int, width: Int = Conv3d.coutBlock) -> Int {
            width == 16 ? 24 : (cin <= 64 ? 16 : 8)
        }

        /// Output-channel blocks of the packed weight (`width` wide).
        static func blocks(_ s: Shape) -> Int { (s.cout + s.packing.blockWidth - 1) / s.packing.blockWidth }

        /// Floats of the transformed weight: [block][xi 64][cin][width].
        static func weightCount(_ s: Shape) -> Int { blocks(s) * 64 * s.cin * s.packing.blockWidth }

        /// U = G g G^T for every (block, input channel) from the direct kernel's packed weight
        /// ([block][tap 27][cin][width]) into [block][xi][cin][width], xi = (a * 4 + b) * 4 + c for the
        /// transformed (d, h, w) index.
        static func transformWeights(packed: UnsafePointer<Float>, into u: UnsafeMutablePointer<Float>, cin: Int,
                                     blocks: Int, width bw: Int) {
            typealias V = SIMD16<Float>
            let half = V(repeating: 0.5)
            withUnsafeTemporaryAllocation(of: V.self, capacity: 27 + 36 + 48 + 64) { buf in
                guard let g = buf.baseAddress else { return }
                let t1 = g + 27, t2 = t1 + 36, t3 = t2 + 48
                for cb in 0..<blocks {
                    for ci in 0..<cin {
                        for k in 0..<(bw / 16) {
                            for tap in 0..<27 { g[tap] = cload(packed + ((cb * 27 + tap) * cin + ci) * bw + k * 16) }
                            // Along w: [kd][kh][kw 3] -> [kd][kh][c 4].
                            for r in 0..<9 {
                                let a = g[r * 3], b = g[r * 3 + 1], c = g[r * 3 + 2]
                                t1[r * 4] = a; t1[r * 4 + 1] = (a + b + c) * half
                                t1[r * 4 + 2] = (a - b + c) * half; t1[r * 4 + 3] = c
                            }
                            // Along h: [kd][kh 3][c] -> [kd][b 4][c].
                            for kd in 0..<3 {
                                for c in 0..<4 {
                                    let a = t1[(kd * 3) * 4 + c], b = t1[(kd * 3 + 1) * 4 + c], e = t1[(kd * 3 + 2) * 4 + c]
                                    t2[(kd * 4) * 4 + c] = a; t2[(kd * 4 + 1) * 4 + c] = (a + b + e) * half
                                    t2[(kd * 4 + 2) * 4 + c] = (a - b + e) * half; t2[(kd * 4 + 3) * 4 + c] = e
                                }
                            }
                            // Along d: [kd 3][b][c] -> [a 4][b][c].
                            for bc in 0..<16 {
                                let a = t2[bc], b = t2[16 + bc], e = t2[32 + bc]
                                t3[bc] = a; t3[16 + bc] = (a + b + e) * half
                                t3[32 + bc] = (a - b + e) * half; t3[48 + bc] = e
                            }
                            for xi in 0..<64 { cstore(t3[xi], u + ((cb * 64 + xi) * cin + ci) * bw + k * 16) }
                        }
                    }
                }
            }
        }

        /// Parts for shape `s`: runs of output plane pairs.
        static func partCount(_ s: Shape, _ maxParts: Int) -> Int { max(1, min(maxParts, s.n * ((s.d + 1) / 2))) }

        /// The sweep both passes share: parts (`partCount`) own runs of output plane pairs; each part keeps
        /// its 4-plane ring, the chunk's transformed input V ([xi][tc][cin]) and `extraFloats` of its own
        /// in the workspace, and for every chunk of at most `tc` tiles of a pair fills V and calls
        /// `chunk(part, n, d0, t0, count, V, extra)`, then `pairDone(part, n, d0)`. Stops early when the
        /// workspace is asked to.
        static func sweep(x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, s: Shape, workspace: Workspace,
                          transform: InputTransform?, parts maxParts: Int, tc: Int, extraFloats: Int,
                          chunk: (_ part: Int, _ n: Int, _ d0: Int, _ t0: Int, _ count: Int,
                                  _ v: UnsafeMutablePointer<Float>, _ extra: UnsafeMutablePointer<Float>) -> Void,
                          pairDone: (_ part: Int, _ n: Int, _ d0: Int) -> Void = { _, _, _ in }) throws {
            let g = Direct.Geometry(s)
            let tilesW = s.w / 2, tiles = (s.h / 2) * tilesW
            let pairsPerSample = (s.d + 1) / 2
            let parts = partCount(s, maxParts)
            let vFloats = 64 * tc * s.cin
            let perPart = 4 * g.planeFloats + vFloats + extraFloats
            let scratch = try workspace.buffer("conv3d.winograd", count: parts * perPart)
            parallelFor(parts) { part in
                let ring = scratch + part * perPart
                let v = ring + 4 * g.planeFloats
                // Rows of a short last chunk past its tiles may be read (whole register tiles): keep them finite.
                v.initialize(repeating: 0, count: vFloats)
                withUnsafeTemporaryAllocation(of: Int.self, capacity: 4) { loadedBuf in
                    guard let loaded = loadedBuf.baseAddress else { return }
                    loaded.initialize(repeating: -1, count: 4)
                    for pair in Threads.range(part, of: parts, total: s.n * pairsPerSample) {
                        if workspace.stopRequested() { return }
                        let n = pair / pairsPerSample, d0 = (pair % pairsPerSample) * 2
                        let p = ensurePlanes(ring: ring, loaded: loaded, n: n, d0: d0, x1: x1, x2: x2, s: s, g: g,
                                             transform: transform)
                        var t0 = 0
                        while t0 < tiles {
                            let count = min(tc, tiles - t0)
                            inputTransform(planes: p, t0: t0, count: count, tilesW: tilesW, g: g, v: v, tc: tc)
                            chunk(part, n, d0, t0, count, v, v + vFloats)
                            t0 += count
                        }
                        pairDone(part, n, d0)
                    }
                }
            }
        }

        /// `Direct.forward` by Winograd (same arguments; `applies(s)` must hold).
        static func forward(x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, packed: UnsafePointer<Float>,
                            bias: UnsafePointer<Float>?, out: Direct.Output, s: Shape,
                            workspace: Workspace, transform: InputTransform?, stats: Statistics?,
                            parts maxParts: Int) throws {
            let cin = s.cin, blocks = blocks(s), bw = s.packing.blockWidth
            let tilesW = s.w / 2
            let tc = chunkTiles(cin: cin, width: bw)
            let u = try workspace.buffer("conv3d.winogradWeights", count: weightCount(s))
            transformWeights(packed: packed, into: u, cin: cin, blocks: blocks, width: bw)
            let voxelsPerSample = s.d * s.h * s.w
            try sweep(x1: x1, x2: x2, s: s, workspace: workspace, transform: transform, parts: maxParts, tc: tc,
                      extraFloats: 64 * tc * bw, chunk: { _, n, d0, t0, count, v, m in
                withUnsafeTemporaryAllocation(of: UnsafePointer<Float>.self, capacity: 1) { baseBuf in
                    guard let base = baseBuf.baseAddress else { return }
                    for cb in 0..<blocks {
                        let ub = u + cb * 64 * cin * bw
                        for xi in 0..<64 {
                            base[0] = UnsafePointer(v + xi * tc * cin)
                            let w = ub + xi * cin * bw, acc = m + xi * tc * bw
                            var j = 0
                            while j < count {
                                if bw == 16 {
                                    Direct.tile24x16(UnsafePointer(base), 1, j * cin, (j + 8) * cin, (j + 16) * cin,
                                                     cin, w, acc + j * 16, false)
                                    j += 24
                                } else {
                                    Direct.tile8x48(UnsafePointer(base), 1, j * cin, cin, w, acc + j * 48, false)
                                    j += 8
                                }
                            }
                        }
                        outputTransform(m: UnsafePointer(m), tc: tc, t0: t0, count: count, tilesW: tilesW,
                                        cb: cb, n: n, d0: d0, s: s, out: out, bias: bias)
                    }
                }
            }, pairDone: { part, n, d0 in
                // The pair's planes, now written (and still in L3).
                if let stats {
                    stats.add(part: part, y: out.y1, v0: n * voxelsPerSample + d0 * s.h * s.w,
                              count: min(2, s.d - d0) * s.h * s.w, voxelsPerSample: voxelsPerSample)
                }
            })
        }

        /// Whether `weightGradient` serves shape `s` with `parts` parts: `applies(s)`, Cout a multiple of
        /// 16, and every part's private sums (64 x Cin x Cout floats) within `Direct.privateSumsLimit`.
        static func appliesToWeightGradient(_ s: Shape, parts: Int) -> Bool {
            applies(s) && s.cout % 16 == 0 && max(1, parts) * 64 * s.cin * s.cout <= Direct.privateSumsLimit
        }

        /// gradWeight (PyTorch layout) += dL/dW by Winograd: per tile, the input's transform V = B^T d B
        /// (as the forward) and grad_y's dM = A gy A^T (2x2x2 -> 4x4x4); per xi, dU[xi] (Cin x Cout) +=
        /// V[xi]^T . dM[xi] over the tiles (`Direct.wgradTaps`, the direct path's register tiles), summed
        /// per part and then in part order; finally dW = G^T dU G per (input, output channel). With an
        /// input transform, the planes hold x' as in the forward. Deterministic for a given thread count.
        static func weightGradient(x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, gradY: UnsafePointer<Float>,
                                   gradWeight: UnsafeMutablePointer<Float>, s: Shape, workspace: Workspace,
                                   transform: InputTransform?, parts maxParts: Int) throws {
            let cin = s.cin, cout = s.cout
            let tilesW = s.w / 2
            let parts = partCount(s, maxParts)
            let tc = 2 * chunkTiles(cin: max(cin, cout))
            let sumFloats = 64 * cin * cout
            let sums = try workspace.buffer("conv3d.winogradWeightSums", count: parts * sumFloats)
            sums.initialize(repeating: 0, count: parts * sumFloats)
            try sweep(x1: x1, x2: x2, s: s, workspace: workspace, transform: transform, parts: maxParts, tc: tc,
                      extraFloats: 64 * tc * cout, chunk: { part, n, d0, t0, count, v, dm in
                gradientTransform(gradY: gradY, n: n, d0: d0, t0: t0, count: count, tilesW: tilesW, s: s, dm: dm, tc: tc)
                let mySums = sums + part * sumFloats
                for xi in 0..<64 {
                    Direct.wgradTaps(gy: UnsafePointer(dm + xi * tc * cout), x: UnsafePointer(v + xi * tc * cin),
                                     rows: 1, width: count, xRowStride: 0, cout: cout, cin: cin,
                                     sums: mySums + xi * cin * cout)
                }
            })
            // Parts in order, then dW[co][ci][tap] += (G^T dU G)[tap] for each (ci, 16 output channels).
            for part in 1..<parts {
                let src = sums + part * sumFloats
                for i in 0..<sumFloats { sums[i] += src[i] }
            }
            typealias V = SIMD16<Float>
            let half = V(repeating: 0.5)
            withUnsafeTemporaryAllocation(of: V.self, capacity: 64 + 48 + 36 + 27) { buf in
                guard let u = buf.baseAddress else { return }
                let t1 = u + 64, t2 = t1 + 48, t3 = t2 + 36
                for ci in 0..<cin {
                    var co = 0
                    while co < cout {
                        for xi in 0..<64 { u[xi] = cload(sums + (xi * cin + ci) * cout + co) }
                        // G^T along w: [a][b][c 4] -> [a][b][kw 3].
                        for ab in 0..<16 {
                            let q0 = u[ab * 4], q1 = u[ab * 4 + 1], q2 = u[ab * 4 + 2], q3 = u[ab * 4 + 3]
                            t1[ab * 3] = q0 + (q1 + q2) * half
                            t1[ab * 3 + 1] = (q1 - q2) * half
                            t1[ab * 3 + 2] = (q1 + q2) * half + q3
                        }
                        // Along h: [a][b 4][kw] -> [a][kh 3][kw].
                        for a in 0..<4 {
                            for kw in 0..<3 {
                                let q0 = t1[(a * 4) * 3 + kw], q1 = t1[(a * 4 + 1) * 3 + kw]
                                let q2 = t1[(a * 4 + 2) * 3 + kw], q3 = t1[(a * 4 + 3) * 3 + kw]
                                t2[(a * 3) * 3 + kw] = q0 + (q1 + q2) * half
                                t2[(a * 3 + 1) * 3 + kw] = (q1 - q2) * half
                                t2[(a * 3 + 2) * 3 + kw] = (q1 + q2) * half + q3
                            }
                        }
                        // Along d: [a 4][kh][kw] -> [kd 3][kh][kw] (the PyTorch tap order).
                        for hw in 0..<9 {
                            let q0 = t2[hw], q1 = t2[9 + hw], q2 = t2[18 + hw], q3 = t2[27 + hw]
                            t3[hw] = q0 + (q1 + q2) * half
                            t3[9 + hw] = (q1 - q2) * half
                            t3[18 + hw] = (q1 + q2) * half + q3
                        }
                        for l in 0..<16 {
                            let dst = gradWeight + ((co + l) * cin + ci) * 27
                            for tap in 0..<27 { dst[tap] += t3[tap][l] }
                        }
                        co += 16
                    }
                }
            }
        }

        /// dM[xi][j][cout] = (A gy A^T) of tiles t0 ..< t0 + count of the pair (d0, d0 + 1) of sample n,
        /// 16 channels at a time (a second plane past D counts as zeros): per axis, a pair (y0, y1) becomes
        /// (y0, y0 + y1, y0 - y1, -y1).
        @inline(__always)
        static func gradientTransform(gradY: UnsafePointer<Float>, n: Int, d0: Int, t0: Int, count: Int, tilesW: Int,
                                      s: Shape, dm: UnsafeMutablePointer<Float>, tc: Int) {
            typealias V = SIMD16<Float>
            let cout = s.cout, xiStride = tc * cout
            let second = d0 + 1 < s.d
            withUnsafeTemporaryAllocation(of: V.self, capacity: 32) { buf in
                guard let t = buf.baseAddress else { return }
                for j in 0..<count {
                    let tile = t0 + j
                    let h0 = 2 * (tile / tilesW), w0 = 2 * (tile % tilesW)
                    let dst = dm + j * cout
                    var c = 0
                    while c < cout {
                        // Along w then h, per plane z: t[z][b 4][c 4] from the 2x2 gy of the plane.
                        for z in 0..<2 {
                            let tz = t + z * 16
                            if z == 1 && !second {
                                for i in 0..<16 { tz[i] = V() }
                                continue
                            }
                            let row0 = gradY + (((n * s.d + d0 + z) * s.h + h0) * s.w + w0) * cout + c
                            let row1 = row0 + s.w * cout
                            let a0 = cload(row0), a1 = cload(row0 + cout), b0 = cload(row1), b1 = cload(row1 + cout)
                            let ra = (a0, a0 + a1, a0 - a1, -a1), rb = (b0, b0 + b1, b0 - b1, -b1)
                            tz[0] = ra.0; tz[1] = ra.1; tz[2] = ra.2; tz[3] = ra.3
                            tz[4] = ra.0 + rb.0; tz[5] = ra.1 + rb.1; tz[6] = ra.2 + rb.2; tz[7] = ra.3 + rb.3
                            tz[8] = ra.0 - rb.0; tz[9] = ra.1 - rb.1; tz[10] = ra.2 - rb.2; tz[11] = ra.3 - rb.3
                            tz[12] = -rb.0; tz[13] = -rb.1; tz[14] = -rb.2; tz[15] = -rb.3
                        }
                        // Along d, storing dM.
                        for bc in 0..<16 {
                            let y0 = t[bc], y1 = t[16 + bc]
                            cstore(y0, dst + bc * xiStride + c)
                            cstore(y0 + y1, dst + (16 + bc) * xiStride + c)
                            cstore(y0 - y1, dst + (32 + bc) * xiStride + c)
                            cstore(-y1, dst + (48 + bc) * xiStride + c)
                        }
                        c += 16
                    }
                }
            }
        }

        /// Makes sure the 4-plane ring holds input planes d0 - 1 ..< d0 + 3 of sample n (zeros outside
        /// 0 ..< D), filling only the missing ones; returns them in order. Plane dIn lives in slot
        /// (dIn + 1) % 4, so the next pair (d0 + 2) keeps the two planes it shares with this one;
        /// `loaded[slot]` records which plane a slot holds.
        static func ensurePlanes(ring: UnsafeMutablePointer<Float>, loaded: UnsafeMutablePointer<Int>, n: Int, d0: Int,
                                 x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, s: Shape, g: Direct.Geometry,
                                 transform: InputTransform?) -> (UnsafePointer<Float>, UnsafePointer<Float>,
                                                                 UnsafePointer<Float>, UnsafePointer<Float>) {
            for k in 0..<4 {
                let dIn = d0 - 1 + k
                let slot = (dIn + 1) % 4
                let key = n * (s.d + 3) + dIn + 1
                if loaded[slot] != key {
                    Direct.fillPlane(ring + slot * g.planeFloats, x1: x1, x2: x2, n: n, dIn: dIn, s: s, g: g,
                                     transform: transform)
                    loaded[slot] = key
                }
            }
            func plane(_ k: Int) -> UnsafePointer<Float> { UnsafePointer(ring + ((d0 + k) % 4) * g.planeFloats) }
            return (plane(0), plane(1), plane(2), plane(3))
        }

        /// V[xi][j][cin] = (B^T d B) of tiles t0 ..< t0 + count of the pair (j = t - t0), 16 channels
        /// at a time: d is the 4x4x4 patch at padded (2 th, 2 tw) of the 4 planes.
        @inline(__always)
        static func inputTransform(planes p: (UnsafePointer<Float>, UnsafePointer<Float>, UnsafePointer<Float>,
                                              UnsafePointer<Float>),
                                   t0: Int, count: Int, tilesW: Int, g: Direct.Geometry,
                                   v: UnsafeMutablePointer<Float>, tc: Int) {
            typealias V = SIMD16<Float>
            let cin = g.cin, rowStride = g.wp * cin, xiStride = tc * cin
            withUnsafeTemporaryAllocation(of: V.self, capacity: 64) { buf in
                guard let t = buf.baseAddress else { return }
                for j in 0..<count {
                    let tile = t0 + j
                    let off = (2 * (tile / tilesW) * g.wp + 2 * (tile % tilesW)) * cin
                    let dst = v + j * cin
                    var c = 0
                    while c < cin {
                        // Along w and h, plane by plane: t[a][b][c'].
                        for a in 0..<4 {
                            let plane = a == 0 ? p.0 : (a == 1 ? p.1 : (a == 2 ? p.2 : p.3))
                            let q = plane + off + c
                            let r0 = rowW(q, cin), r1 = rowW(q + rowStride, cin)
                            let r2 = rowW(q + 2 * rowStride, cin), r3 = rowW(q + 3 * rowStride, cin)
                            let ta = t + a * 16
                            columnH(r0.0, r1.0, r2.0, r3.0, ta)
                            columnH(r0.1, r1.1, r2.1, r3.1, ta + 1)
                            columnH(r0.2, r1.2, r2.2, r3.2, ta + 2)
                            columnH(r0.3, r1.3, r2.3, r3.3, ta + 3)
                        }
                        // Along d, storing V.
                        for bc in 0..<16 {
                            let d0 = t[bc], d1 = t[16 + bc], d2 = t[32 + bc], d3 = t[48 + bc]
                            cstore(d0 - d2, dst + bc * xiStride + c)
                            cstore(d1 + d2, dst + (16 + bc) * xiStride + c)
                            cstore(d2 - d1, dst + (32 + bc) * xiStride + c)
                            cstore(d1 - d3, dst + (48 + bc) * xiStride + c)
                        }
                        c += 16
                    }
                }
            }
        }

        /// B^T along w of one row of 4 voxels (16 channels each, `cin` floats apart).
        @inline(__always)
        static func rowW(_ q: UnsafePointer<Float>, _ cin: Int) -> (SIMD16<Float>, SIMD16<Float>, SIMD16<Float>, SIMD16<Float>) {
            let d0 = cload(q), d1 = cload(q + cin), d2 = cload(q + 2 * cin), d3 = cload(q + 3 * cin)
            return (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
        }

        /// B^T along h of one column (rows 0 ..< 4 of one transformed w index): t[b * 4] for b in 0 ..< 4.
        @inline(__always)
        static func columnH(_ d0: SIMD16<Float>, _ d1: SIMD16<Float>, _ d2: SIMD16<Float>, _ d3: SIMD16<Float>,
                            _ t: UnsafeMutablePointer<SIMD16<Float>>) {
            t[0] = d0 - d2; t[4] = d1 + d2; t[8] = d2 - d1; t[12] = d1 - d3
        }

        /// y for tiles t0 ..< t0 + count, output channels of block cb: A^T M A of each tile's 64
        /// products (M[xi][j][width]), written voxel by voxel through `Direct.write` (a second plane past
        /// D is dropped).
        @inline(__always)
        static func outputTransform(m: UnsafePointer<Float>, tc: Int, t0: Int, count: Int, tilesW: Int, cb: Int,
                                    n: Int, d0: Int, s: Shape, out: Direct.Output, bias: UnsafePointer<Float>?) {
            typealias V = SIMD16<Float>
            let bw = s.packing.blockWidth
            let lo = cb * bw, valid = min(bw, s.cout - lo)
            let xiStride = tc * bw
            let planes = min(2, s.d - d0)
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 8 * 48 + 32 * 16) { buf in
                guard let ob = buf.baseAddress else { return }
                let t = UnsafeMutableRawPointer(ob + 8 * 48).bindMemory(to: V.self, capacity: 32)
                for j in 0..<count {
                    let src = m + j * bw
                    for k in 0..<(bw / 16) {
                        // Along w: [a][b][c 4] -> t[a][b][2] (32), then along h and d into 8 outputs.
                        for ab in 0..<16 {
                            let q = src + ab * 4 * xiStride + k * 16
                            let m0 = cload(q), m1 = cload(q + xiStride), m2 = cload(q + 2 * xiStride), m3 = cload(q + 3 * xiStride)
                            t[ab * 2] = m0 + m1 + m2
                            t[ab * 2 + 1] = m1 - m2 - m3
                        }
                        // Along h: t[a][b 4][x] -> [a][y 2][x] (in place in the first 16 of each a).
                        for a in 0..<4 {
                            for x in 0..<2 {
                                let b0 = t[(a * 4) * 2 + x], b1 = t[(a * 4 + 1) * 2 + x]
                                let b2 = t[(a * 4 + 2) * 2 + x], b3 = t[(a * 4 + 3) * 2 + x]
                                t[(a * 4) * 2 + x] = b0 + b1 + b2
                                t[(a * 4 + 1) * 2 + x] = b1 - b2 - b3
                            }
                        }
                        // Along d: [a 4][y][x] -> [z 2][y][x], into ob[(z * 4 + y * 2 + x) * 48 + k * 16].
                        for yx in 0..<4 {
                            let a0 = t[yx], a1 = t[8 + yx], a2 = t[16 + yx], a3 = t[24 + yx]
                            cstore(a0 + a1 + a2, ob + yx * 48 + k * 16)
                            cstore(a1 - a2 - a3, ob + (4 + yx) * 48 + k * 16)
                        }
                    }
                    let tile = t0 + j
                    let h0 = 2 * (tile / tilesW), w0 = 2 * (tile % tilesW)
                    for z in 0..<planes {
                        for y in 0..<2 {
                            let vox = ((n * s.d + d0 + z) * s.h + h0 + y) * s.w + w0
                            Direct.write(UnsafePointer(ob + (z * 4 + y * 2) * 48), voxel: vox, lo: lo, valid: valid,
                                         out: out, bias: bias)
                            Direct.write(UnsafePointer(ob + (z * 4 + y * 2 + 1) * 48), voxel: vox + 1, lo: lo,
                                         valid: valid, out: out, bias: bias)
                        }
                    }
                }
            }
        }
    }
}
