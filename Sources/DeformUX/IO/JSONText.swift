/// Writing JSON text by hand where the engine builds small documents (safetensors headers, model cards,
/// NIfTI headers for the C ABI): one escaping rule for every writer.
public enum JSONText {
    /// `s` as a JSON string literal: quotes, backslashes and control characters escaped (RFC 8259).
    public static func string(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 {
                    let hex = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }
}
