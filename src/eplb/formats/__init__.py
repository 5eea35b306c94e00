"""eplb.formats"""
